/* A QEMU TCG plugin for benchmarks/arm64_cost.py: counts the guest instructions qemu-aarch64 executes and writes
 * the running count to a file each time the guest writes to its standard output. elemental-native-classify
 * prints one line per photo, so one photo's cost is the difference between two consecutive counts.
 *
 *   qemu-aarch64 -plugin ./qemu_insn_count.so,out=COUNTS PROGRAM ARGS...
 *
 * Debian's qemu-user is built with plugin support but ships no plugin header; the declarations below are the
 * few entry points of QEMU's stable plugin C API (docs/devel/tcg-plugins) that this file calls. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#ifndef PLUGIN_API_VERSION
#define PLUGIN_API_VERSION 1
#endif

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 = 0 };
struct qemu_info_t;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS = 0 };
typedef void (*tb_trans_cb)(qemu_plugin_id_t id, struct qemu_plugin_tb * tb);
typedef void (*vcpu_udata_cb)(unsigned int vcpu_index, void * userdata);
typedef void (*udata_cb)(qemu_plugin_id_t id, void * userdata);
typedef void (*syscall_cb)(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1, uint64_t a2,
                           uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb * tb, vcpu_udata_cb cb, enum qemu_plugin_cb_flags flags,
                                          void * userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb * tb);
/* The fast path (an add compiled into the translated block, no call per block), in QEMU's API until 9.0; weak,
 * so that a QEMU without it falls back to the callback. */
__attribute__((weak)) void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb * tb, enum qemu_plugin_op op,
                                                                     void * ptr, uint64_t imm);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, syscall_cb cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb cb, void * userdata);

__attribute__((visibility("default"))) int qemu_plugin_version = PLUGIN_API_VERSION;

static uint64_t executed;  /* guest instructions so far, all threads */
static FILE * out;

static void on_exec(unsigned int vcpu_index, void * n_insns) {
    (void) vcpu_index;
    __atomic_fetch_add(&executed, (uint64_t) (uintptr_t) n_insns, __ATOMIC_RELAXED);
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb * tb) {
    (void) id;
    const size_t n = qemu_plugin_tb_n_insns(tb);
    if (qemu_plugin_register_vcpu_tb_exec_inline) {  /* not atomic: count one guest thread (--threads 1) */
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &executed, n);
    } else {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS, (void *) (uintptr_t) n);
    }
}

enum { AARCH64_SYS_WRITE = 64, STDOUT = 1 };

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8) {
    (void) id, (void) vcpu_index, (void) a2, (void) a3, (void) a4, (void) a5, (void) a6, (void) a7, (void) a8;
    if (num == AARCH64_SYS_WRITE && a1 == STDOUT) {
        fprintf(out, "write %llu\n", (unsigned long long) __atomic_load_n(&executed, __ATOMIC_RELAXED));
        fflush(out);
    }
}

static void on_exit(qemu_plugin_id_t id, void * userdata) {
    (void) id, (void) userdata;
    fprintf(out, "exit %llu\n", (unsigned long long) executed);
    fclose(out);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const struct qemu_info_t * info,
                                                                int argc, char ** argv) {
    (void) info;
    const char * path = NULL;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            path = argv[i] + 4;
        }
    }
    if (!path || !(out = fopen(path, "w"))) {
        fprintf(stderr, "qemu_insn_count: give a writable out=FILE\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, on_exit, NULL);
    return 0;
}
