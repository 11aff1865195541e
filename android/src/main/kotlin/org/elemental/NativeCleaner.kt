// Frees what an object holds in native memory once the garbage collector finds it unreachable: the safety net
// for a classifier nobody closed (hundreds of MB of model). java.lang.ref.Cleaner does exactly this, but Android
// has it only from API 33 and the module supports API 26, so this is the same mechanism spelled out: a
// PhantomReference per object, one daemon thread that runs the cleanup of each one the GC enqueues.
package org.elemental

import java.lang.ref.PhantomReference
import java.lang.ref.ReferenceQueue
import java.util.Collections
import java.util.IdentityHashMap

internal object NativeCleaner {
    private val queue = ReferenceQueue<Any>()
    // The references themselves must stay reachable until the GC enqueues them, or they are collected unrun.
    private val pending: MutableSet<Cleanable> = Collections.synchronizedSet(Collections.newSetFromMap(IdentityHashMap()))

    /** A registered cleanup: run it (at most once) with clean(), or let the GC run it when its owner is gone. */
    class Cleanable internal constructor(owner: Any, private val action: () -> Unit) : PhantomReference<Any>(owner, queue) {
        fun clean() {
            if (pending.remove(this)) {
                clear()
                action()
            }
        }
    }

    init {
        val thread = Thread({
            while (true) {
                try {
                    (queue.remove() as Cleanable).clean()
                } catch (e: InterruptedException) {
                    // a daemon thread: nothing to stop for
                } catch (e: Throwable) {
                    // one failed cleanup must not end the thread that runs the others
                }
            }
        }, "elemental-cleaner")
        thread.isDaemon = true
        thread.start()
    }

    /** Runs `action` once `owner` is unreachable, unless clean() ran it first. `action` must not reference `owner`. */
    fun register(owner: Any, action: () -> Unit): Cleanable = Cleanable(owner, action).also { pending.add(it) }
}
