// Model delivery: an `elemental export` folder (manifest.json and the GGUF files it lists) downloaded from a URL
// the app gives, or copied from a local folder, onto the device. The GGUF files are hundreds of MB, so they don't
// belong in the APK: Play caps the base APK at 200 MB, and llama.cpp opens paths, so an asset would be stored
// twice. Plain JVM (no Android classes), so the desktop tests run it against a local HTTP server that cuts,
// corrupts and redirects transfers.
package org.elemental

import java.io.ByteArrayOutputStream
import java.io.File
import java.io.FileInputStream
import java.io.FileOutputStream
import java.io.IOException
import java.io.InputStream
import java.io.OutputStream
import java.io.RandomAccessFile
import java.net.HttpURLConnection
import java.net.MalformedURLException
import java.net.URL
import java.nio.channels.FileLock
import java.nio.channels.OverlappingFileLockException
import java.nio.file.Files
import java.nio.file.StandardCopyOption
import java.security.MessageDigest
import java.util.concurrent.CancellationException
import org.json.JSONException
import org.json.JSONObject

/**
 * Model folders under [root]. `root/<name>` only ever appears complete: manifest.json, the files it lists (each
 * checked against the manifest's size and sha256) and verified.json, the stamp that spares the native library a
 * second hash of them at open. Work in progress stays in `root/<name>.partial`, so an install that failed (network
 * lost, app killed, cancelled) resumes where it stopped on the next call with the same name.
 *
 * The calls block the calling thread: run them from a worker or an IO coroutine. A blocking socket read is not
 * interruptible, so a cancel takes effect at the next chunk or after [readTimeoutMs].
 */
class ModelStore @JvmOverloads constructor(
    val root: File,
    private val connectTimeoutMs: Int = 15_000,
    private val readTimeoutMs: Int = 30_000
) {

    /** The installed folder of [name] (ready for [ElementClassifier.open]), or null if there is none. */
    fun installed(name: String): File? {
        checkName(name)
        val folder = File(root, name)
        return if (File(folder, MANIFEST).isFile) folder else null
    }

    /**
     * Downloads `<baseUrl>/manifest.json` and the files it lists (`<baseUrl>/<file name>`) and installs them as
     * `root/<name>`, replacing an older install of that name only once the new one is complete.
     *
     * @param quants keep only the text GGUFs of these types (plus the mmproj); null: every file listed
     * @param progress bytes done and total over the files installed; `done` can go back when a server can't
     *   resume a file and it starts over
     * @param cancelled polled between chunks, like the thread's interrupt flag: true ends the install with a
     *   CancellationException (what was fetched stays for the next call)
     * @throws ElementalException naming the URL or file and what differs; a network failure leaves the partial
     *   file, so calling again resumes it
     */
    @JvmOverloads
    fun install(baseUrl: String, name: String, quants: Set<String>? = null,
                progress: ((done: Long, total: Long) -> Unit)? = null, cancelled: (() -> Boolean)? = null): File {
        checkName(name)
        val base = baseUrl.trimEnd('/')
        return put(name, Http(base, httpUrl("$base/$MANIFEST")), quants, progress, cancelled)
    }

    /** [install] from a local export folder (a copy, each file checked while copying). */
    @JvmOverloads
    fun installFrom(folder: File, name: String, quants: Set<String>? = null,
                    progress: ((done: Long, total: Long) -> Unit)? = null, cancelled: (() -> Boolean)? = null): File {
        checkName(name)
        return put(name, Local(folder), quants, progress, cancelled)
    }

    // -- the install, whatever the source ------------------------------------------------------------------

    private class Entry(val name: String, val size: Long, val sha256: String, val role: String, val quant: String) {
        // Keyed by digest: a .part left by an older manifest is never resumed into a different file.
        val partName = "$name.${sha256.take(16)}$PART"
    }

    private class Job(val name: String, val total: Long, val progress: ((Long, Long) -> Unit)?,
                      val cancelled: (() -> Boolean)?) {
        var done = 0L

        fun advance(bytes: Long) {
            done += bytes
            progress?.invoke(done, total)
        }

        fun checkCancelled() {
            if (Thread.currentThread().isInterrupted || cancelled?.invoke() == true) {
                throw CancellationException("install of $name cancelled; what it fetched stays for the next call")
            }
        }
    }

    /** Where the files come from: [fill] makes `part` hold the entry's bytes and returns their sha256. */
    private interface Source {
        val manifest: String
        fun readManifest(): ByteArray
        fun where(e: Entry): String
        fun fill(e: Entry, part: File, job: Job): String
    }

    private fun put(name: String, source: Source, quants: Set<String>?, progress: ((Long, Long) -> Unit)?,
                    cancelled: (() -> Boolean)?): File = try {
        val raw = source.readManifest()
        val (json, all) = parseManifest(raw, source.manifest)
        val chosen = choose(all, quants, source.manifest)
        val job = Job(name, chosen.map { it.size }.sum(), progress, cancelled)
        job.checkCancelled()
        if (!root.isDirectory && !root.mkdirs()) fail("$root: cannot create the models folder")
        exclusive(name) {
            val final = File(root, name)
            val old = File(root, name + OLD)
            // An install that stopped between its two renames left the previous one aside: put it back.
            if (!final.exists() && old.isDirectory) move(old, final)
            val staging = File(root, name + PARTIAL)
            if (!staging.isDirectory && !staging.mkdirs()) fail("$staging: cannot create the folder")
            val keep = chosen.flatMap { listOf(it.name, it.partName) }.toSet()
            staging.listFiles()?.filter { it.name !in keep }?.forEach { it.deleteRecursively() }

            for (e in chosen) {
                val done = File(staging, e.name)
                // A file verified by an earlier, interrupted call is kept if it still is what the manifest says.
                if (done.isFile && done.length() == e.size && sha256(done) == e.sha256) {
                    job.advance(e.size)
                    continue
                }
                done.delete()
                val part = File(staging, e.partName)
                val digest = source.fill(e, part, job)
                if (digest != e.sha256) {
                    part.delete()  // not resumable: the next call starts this file over
                    fail("${source.where(e)}: sha256 ${digest.take(12)}... differs from ${e.sha256.take(12)}... in " +
                         "${source.manifest} (not the exported file; the copy was deleted)")
                }
                move(part, done)
            }
            val manifest = if (chosen.size == all.size) raw else withOnly(json, chosen).toString(2).toByteArray(Charsets.UTF_8)
            writeAtomically(File(staging, MANIFEST), manifest)
            writeAtomically(File(staging, STAMP), stamp(staging, chosen))

            if (final.exists()) {
                old.deleteRecursively()
                move(final, old)
            }
            move(staging, final)
            old.deleteRecursively()
            final
        }
    } catch (x: IOException) {  // the device's side (a full disk, a removed card): network errors are named above
        fail("installing '$name' into $root: $x")
    }

    /** The manifest's files, each with a plain name (a server must not write outside the folder). org.json is
     *  Android's own (on the desktop: Debian's libandroid-json-java, the same code); it keeps the keys' order. */
    private fun parseManifest(raw: ByteArray, where: String): Pair<JSONObject, List<Entry>> {
        val json = try {
            JSONObject(String(raw, Charsets.UTF_8))
        } catch (x: JSONException) {
            fail("$where: not valid JSON (${x.message})")
        }
        val files = json.optJSONObject("files") ?: fail("$where: field 'files' is missing or not an object")
        val entries = files.keys().asSequence().toList().map { name ->
            val at = "$where files['$name']"
            if (name == "" || name.startsWith(".") || name.contains("..") || name == MANIFEST || name == STAMP ||
                name.endsWith(PART) || name.any { it == '/' || it == '\\' || it < ' ' }) {
                fail("$at: file name refused: a manifest lists plain file names inside its folder")
            }
            val info = files.optJSONObject(name) ?: fail("$at: not an object")
            val size = info.opt("size_bytes")
            Entry(name,
                  (if (size is Int || size is Long) (size as Number).toLong() else null)?.takeIf { it >= 0 }
                      ?: fail("$at: field 'size_bytes' is missing or not a byte count"),
                  (info.opt("sha256") as? String)?.toLowerCase()?.takeIf { SHA256_HEX.matches(it) }
                      ?: fail("$at: field 'sha256' is missing or not 64 hex digits"),
                  info.opt("role") as? String ?: fail("$at: field 'role' is missing or not a string"),
                  info.opt("quant") as? String ?: fail("$at: field 'quant' is missing or not a string"))
        }
        return json to entries
    }

    private fun choose(all: List<Entry>, quants: Set<String>?, where: String): List<Entry> {
        if (quants == null) return all
        val text = all.filter { it.role == "text" }
        val missing = quants.filter { q -> text.none { it.quant == q } }
        if (quants.isEmpty() || missing.isNotEmpty()) {
            fail("$where lists no text GGUF of type ${missing.ifEmpty { "(none asked)" }}; it has " +
                 "${text.map { it.quant }}")
        }
        return all.filter { it.role != "text" || it.quant in quants }
    }

    // The manifest copy lists only what was installed, so the native side's check of it holds.
    private fun withOnly(json: JSONObject, chosen: List<Entry>): JSONObject {
        val files = json.getJSONObject("files")
        val kept = JSONObject()
        for (e in chosen) kept.put(e.name, files.getJSONObject(e.name))
        return json.put("files", kept)  // put on an existing key keeps its place
    }

    // verified.json: the files' final size and mtime with the digest just checked; the native library trusts a
    // file whose size and mtime (stat's, in ms) still match and hashes it otherwise. Read after the files' final
    // renames, through java.nio: File.lastModified() is whole seconds on some JVMs (OpenJDK 8 on Linux).
    private fun stamp(folder: File, chosen: List<Entry>): ByteArray {
        val files = JSONObject()
        for (e in chosen) {
            val path = File(folder, e.name).toPath()
            files.put(e.name, JSONObject().put("size", Files.size(path))
                .put("mtime_ms", Files.getLastModifiedTime(path).toMillis()).put("sha256", e.sha256))
        }
        return JSONObject().put("format", 1).put("files", files).toString(2).toByteArray(Charsets.UTF_8)
    }

    // One install of a name at a time, across threads and processes (a worker's retry beside the UI's call).
    private fun <T> exclusive(name: String, block: () -> T): T {
        val file = File(root, name + LOCK)
        // Closing the file releases the lock (release() itself would throw on an interrupted thread).
        RandomAccessFile(file, "rw").use { raf ->
            val lock: FileLock? = try {
                raf.channel.tryLock()
            } catch (x: OverlappingFileLockException) {
                null
            }
            lock ?: fail("$file: another install of '$name' is running")
            return block()
        }
    }

    // -- sources -------------------------------------------------------------------------------------------

    private class Local(val folder: File) : Source {
        override val manifest = File(folder, MANIFEST).path

        override fun readManifest(): ByteArray {
            val file = File(manifest)
            if (!file.isFile) fail("$folder has no $MANIFEST: not a folder written by `elemental export`")
            return file.readBytes()
        }

        override fun where(e: Entry) = File(folder, e.name).path

        override fun fill(e: Entry, part: File, job: Job): String {
            val src = File(folder, e.name)
            if (!src.isFile) fail("$src: missing (listed in $manifest)")
            if (src.length() != e.size) fail("$src is ${src.length()} bytes, $manifest says ${e.size}")
            val digest = MessageDigest.getInstance("SHA-256")
            FileInputStream(src).use { input ->
                FileOutputStream(part).use { out ->
                    val got = pump(input, out, digest, e.size, job) { x, _ -> throw x }
                    if (got < e.size) fail("$src: ended after $got of ${e.size} bytes while copying")
                    out.fd.sync()
                }
            }
            return hex(digest.digest())
        }
    }

    private inner class Http(val base: String, private val manifestUrl: URL) : Source {
        override val manifest = manifestUrl.toString()

        override fun readManifest() = fetchManifest(manifestUrl)

        override fun where(e: Entry) = "$base/${pathSegment(e.name)}"

        override fun fill(e: Entry, part: File, job: Job): String {
            val url = httpUrl(where(e))
            var have = if (part.isFile) part.length() else 0L
            if (have > e.size) {
                part.delete()
                have = 0
            }
            // The hash covers the resumed prefix too, re-read from disk: a corrupt .part fails the check.
            val digest = MessageDigest.getInstance("SHA-256")
            if (have > 0) FileInputStream(part).use { pump(it, NULL_OUTPUT, digest, have, null) { x, _ -> throw x } }
            job.advance(have)
            if (have == e.size) return hex(digest.digest())

            var c = request(url, have)
            if (c.responseCode == RANGE_NOT_SATISFIABLE && have > 0) {
                // The .part is not a prefix of what the server has now (a replaced file); start over.
                c.disconnect()
                job.advance(-have)
                have = 0
                digest.reset()
                c = request(url, 0)
            }
            try {
                when (c.responseCode) {
                    HttpURLConnection.HTTP_PARTIAL -> {
                        val range = c.getHeaderField("Content-Range")
                        val m = range?.let { CONTENT_RANGE.matchEntire(it.trim()) }
                        if (m == null || m.groupValues[1].toLong() != have) {
                            fail("$url: asked for bytes from $have, the server sent range ${range ?: "(none)"}")
                        }
                        m.groupValues[3].toLongOrNull()?.let { checkSize(url, it, e) }
                    }
                    HttpURLConnection.HTTP_OK -> {
                        if (have > 0) {  // the server ignored Range: the body starts at byte 0
                            job.advance(-have)
                            have = 0
                            digest.reset()
                        }
                        c.getHeaderFieldLong("Content-Length", -1).takeIf { it >= 0 }?.let { checkSize(url, it, e) }
                    }
                    else -> fail("$url: HTTP ${c.responseCode} ${c.responseMessage ?: ""}".trimEnd())
                }
                val from = have
                FileOutputStream(part, from > 0).use { out ->
                    val got = pump(c.inputStream, out, digest, e.size - from, job) { x, moved ->
                        fail("$url: connection lost after ${from + moved} of ${e.size} bytes ($x); install again to resume")
                    }
                    if (from + got < e.size) {
                        fail("$url: the transfer ended after ${from + got} of ${e.size} bytes; install again to resume")
                    }
                    out.fd.sync()
                }
            } finally {
                c.disconnect()
            }
            return hex(digest.digest())
        }

        private fun checkSize(url: URL, serverSize: Long, e: Entry) {
            if (serverSize != e.size) fail("$url: the server's file is $serverSize bytes, $manifest says ${e.size}")
        }
    }

    // -- HTTP ----------------------------------------------------------------------------------------------

    private fun fetchManifest(url: URL): ByteArray {
        val c = request(url, 0)
        try {
            if (c.responseCode != HttpURLConnection.HTTP_OK) {
                fail("$url: HTTP ${c.responseCode} ${c.responseMessage ?: ""}".trimEnd())
            }
            val bytes = ByteArrayOutputStream()
            val got = pump(c.inputStream, bytes, null, MAX_MANIFEST + 1, null) { x, _ ->
                fail("$url: connection lost ($x)")
            }
            if (got > MAX_MANIFEST) fail("$url: over $MAX_MANIFEST bytes, not a manifest")
            return bytes.toByteArray()
        } finally {
            c.disconnect()
        }
    }

    /** A GET of `url` (from byte `from` on), its redirects followed to http/https only; the response is unread. */
    private fun request(url: URL, from: Long): HttpURLConnection {
        var at = url
        repeat(MAX_REDIRECTS + 1) {
            val c = at.openConnection() as HttpURLConnection
            c.instanceFollowRedirects = false  // followed here, where the target's scheme is checked
            c.connectTimeout = connectTimeoutMs
            c.readTimeout = readTimeoutMs
            c.useCaches = false
            // Android's HttpURLConnection would ask for gzip and unzip it, and a byte range of that is meaningless.
            c.setRequestProperty("Accept-Encoding", "identity")
            if (from > 0) c.setRequestProperty("Range", "bytes=$from-")
            val code = try {
                c.responseCode
            } catch (x: IOException) {
                c.disconnect()
                fail("$at: $x")
            }
            if (code !in REDIRECTS) return c
            val location = c.getHeaderField("Location")
            c.disconnect()
            location ?: fail("$at: HTTP $code without a Location")
            val next = try {
                URL(at, location)
            } catch (x: MalformedURLException) {
                fail("$at: redirect to '$location' refused: not a URL")
            }
            if (next.protocol != "http" && next.protocol != "https") {
                fail("$at: redirect to '$location' refused: only http and https are followed")
            }
            if (at.protocol == "https" && next.protocol == "http") fail("$at: redirect to plain http '$location' refused")
            at = next
        }
        fail("$url: more than $MAX_REDIRECTS redirects")
    }

    private fun httpUrl(text: String): URL {
        val url = try {
            URL(text)
        } catch (x: MalformedURLException) {
            fail("'$text' is not a URL")
        }
        if (url.protocol != "http" && url.protocol != "https") fail("$text: only http and https URLs are fetched")
        return url
    }

    private companion object {
        const val MANIFEST = "manifest.json"
        const val STAMP = "verified.json"
        const val PART = ".part"
        const val PARTIAL = ".partial"
        const val OLD = ".old"
        const val LOCK = ".lock"
        const val CHUNK = 64 * 1024
        const val MAX_MANIFEST = 4L * 1024 * 1024
        const val MAX_REDIRECTS = 5
        const val RANGE_NOT_SATISFIABLE = 416
        val REDIRECTS = setOf(301, 302, 303, 307, 308)
        val NAME = Regex("[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
        val SHA256_HEX = Regex("[0-9a-f]{64}")
        val CONTENT_RANGE = Regex("bytes (\\d+)-(\\d+)/(\\d+|\\*)")
        val NULL_OUTPUT = object : OutputStream() {
            override fun write(b: Int) {}
            override fun write(b: ByteArray, off: Int, len: Int) {}
        }

        fun fail(message: String): Nothing = throw ElementalException(message)

        // The folder, its .partial, .old and .lock siblings stay inside root and distinct from other names'.
        fun checkName(name: String) {
            if (!NAME.matches(name) || listOf(PARTIAL, OLD, LOCK).any { name.endsWith(it) }) {
                fail("model name '$name' refused: use up to 128 letters, digits, '.', '_', '-', not starting " +
                     "with '.' nor ending with $PARTIAL, $OLD or $LOCK")
            }
        }

        /**
         * Copies up to `count` bytes from `input` to `out`, hashing them into `digest`; returns how many came before `input`
         * ended. A read error goes to `lost` with the bytes moved so far (a write error propagates).
         */
        fun pump(input: InputStream, out: OutputStream, digest: MessageDigest?, count: Long, job: Job?,
                 lost: (IOException, Long) -> Nothing): Long {
            val buf = ByteArray(CHUNK)
            var moved = 0L
            while (moved < count) {
                job?.checkCancelled()
                val n = try {
                    input.read(buf, 0, minOf(CHUNK.toLong(), count - moved).toInt())
                } catch (x: IOException) {
                    lost(x, moved)
                }
                if (n < 0) break
                out.write(buf, 0, n)
                digest?.update(buf, 0, n)
                moved += n
                job?.advance(n.toLong())
            }
            return moved
        }

        fun sha256(file: File): String {
            val digest = MessageDigest.getInstance("SHA-256")
            FileInputStream(file).use { pump(it, NULL_OUTPUT, digest, file.length(), null) { x, _ -> throw x } }
            return hex(digest.digest())
        }

        fun hex(bytes: ByteArray) = bytes.joinToString("") { String.format("%02x", it) }

        // RFC 3986 unreserved characters stay, everything else is percent-encoded (names may hold spaces, '+').
        fun pathSegment(name: String) = name.toByteArray(Charsets.UTF_8).joinToString("") {
            val c = it.toChar()
            if (c in 'A'..'Z' || c in 'a'..'z' || c in '0'..'9' || c in "-._~") c.toString() else String.format("%%%02X", it)
        }

        fun move(from: File, to: File) {
            Files.move(from.toPath(), to.toPath(), StandardCopyOption.ATOMIC_MOVE)
        }

        // A reader sees the old file or the new one, never half of it; synced first so a power cut can't either.
        fun writeAtomically(file: File, bytes: ByteArray) {
            val tmp = File(file.parentFile, ".${file.name}.tmp")
            FileOutputStream(tmp).use {
                it.write(bytes)
                it.fd.sync()
            }
            move(tmp, file)
        }
    }
}
