// A desktop JVM caller of org.elemental.ModelStore, for tests/test_model_store.py (an object, not a top-level
// main: ClassifyPhotos.kt has that in the same jar and package):
//
//   java -cp elemental-jvm.jar ModelStoreMain install ROOT NAME BASE_URL [options]
//   java -cp elemental-jvm.jar ModelStoreMain install-from ROOT NAME FOLDER [options]
//   options: --quants Q8_0,Q4_0   --read-timeout-ms N   --cancel-after BYTES (cancel once that many are done)
//
// Prints one JSON line {"folder": ..., "progress": {"calls", "done", "total"}}, or `error: <message>` with exit
// code 2 (an ElementalException), or `cancelled: <message>` with exit code 3.
import org.elemental.ElementalException
import org.elemental.ModelStore
import java.io.File
import java.util.concurrent.CancellationException
import kotlin.system.exitProcess

object ModelStoreMain {
    private fun quote(s: String): String = "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\""

    @JvmStatic
    fun main(args: Array<String>) {
        val (command, root, name, from) = args.take(4).also { require(it.size == 4) { "usage: see ModelStoreMain.kt" } }
        val options = args.drop(4).chunked(2).associate { it[0] to it[1] }
        val quants = options["--quants"]?.split(",")?.toSet()
        val store = ModelStore(File(root), readTimeoutMs = options["--read-timeout-ms"]?.toInt() ?: 30_000)
        val cancelAfter = options["--cancel-after"]?.toLong() ?: Long.MAX_VALUE
        var calls = 0
        var done = 0L
        var total = 0L
        val progress = { d: Long, t: Long ->
            calls++
            done = d
            total = t
        }
        try {
            val folder = when (command) {
                "install" -> store.install(from, name, quants, progress) { done >= cancelAfter }
                "install-from" -> store.installFrom(File(from), name, quants, progress) { done >= cancelAfter }
                else -> throw IllegalArgumentException("unknown command $command")
            }
            check(store.installed(name) == folder)
            println("{\"folder\": ${quote(folder.path)}, \"progress\": {\"calls\": $calls, \"done\": $done, \"total\": $total}}")
        } catch (e: ElementalException) {
            println("error: ${e.message}")
            exitProcess(2)
        } catch (e: CancellationException) {
            println("cancelled: ${e.message}")
            exitProcess(3)
        }
    }
}
