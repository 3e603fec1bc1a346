/*
 * superd._spawn: start a program without touching the daemon's credentials.
 *
 * One call, spawn(), clones a child that shares the daemon's memory and
 * suspends the daemon until the child has called execve (glibc's
 * posix_spawn and CPython's vfork path work the same way):
 *
 *     clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD)
 *
 * The child runs on a stack of its own and makes only raw system calls:
 * every signal to its default disposition, setsid, the descriptors
 * (0 and 1 the connection, 2 the stderr pipe or /dev/null, 3 a status pipe
 * when asked, everything else close-on-exec), rlimits, nice, umask, chdir,
 * an empty signal mask, execve.
 *
 * The child never takes another user's identity: while the daemon waits
 * for its exec, a child owned by another user could be stopped (SIGSTOP)
 * by that user, and the daemon with it.  For another user, Python has the
 * child exec superd-exec (superd/_exec.c), a separate small program that
 * switches ids, changes directory and execs the service's program in a
 * process of its own, reporting a failure on the status pipe, which the
 * daemon reads from its event loop.  Only root's own groups (user: root)
 * are set here, with raw syscalls (glibc's setgroups broadcasts to every
 * thread of the calling process, unsafe in a vfork child).
 *
 * A failing step stores its errno and its name in memory the daemon
 * shares, then exits 127: the daemon reaps that child at once and raises
 * OSError, so a failure before exec is reported synchronously.  On success
 * the call returns (pid, pidfd).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

#define STACK_SIZE (256 * 1024)
#define MAX_RLIMITS 16
#define KSIGSET_BYTES ((_NSIG - 1) / 8)

struct plan {
    const char *path;
    char *const *argv;
    char *const *envp;
    int stdio;
    int err;            /* fd for stderr, or -1 for /dev/null */
    int status;         /* fd to pass as 3 (superd-exec's status pipe), or -1 */
    const char *cwd;    /* NULL: stay in / */
    int set_ids;
    uid_t uid;
    gid_t gid;
    size_t ngroups;
    const gid_t *groups;
    int umask;          /* -1: keep */
    int set_nice;
    int nice;
    int nrlimits;
    int rl_resource[MAX_RLIMITS];
    struct rlimit rl_value[MAX_RLIMITS];
    /* written by the child before _exit on failure */
    volatile int failed_errno;
    const char *volatile failed_step;
};

static char *child_stack;

/* A raw syscall; on failure record errno and the step, and leave. */
#define STEP(name, call)                          \
    do {                                          \
        if ((long)(call) < 0) {                   \
            p->failed_errno = errno;              \
            p->failed_step = (name);              \
            syscall(SYS_exit_group, 127);         \
        }                                         \
    } while (0)

static void
child_signals_default(void)
{
    /* A zeroed kernel sigaction is SIG_DFL with no flags and an empty mask
     * on every architecture's layout. */
    unsigned long ksa[8];
    memset(ksa, 0, sizeof ksa);
    for (int sig = 1; sig < _NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        syscall(SYS_rt_sigaction, sig, ksa, NULL, KSIGSET_BYTES);
    }
}

/* fd *from* as fd *to*, inherited across exec (dup3 refuses from == to) */
static long
move_fd(int from, int to)
{
    if (from == to)
        return syscall(SYS_fcntl, to, F_SETFD, 0);
    return syscall(SYS_dup3, from, to, 0);
}

/* The daemon keeps its own 0, 1 and 2 on /dev/null, so stdio and err are
 * never below 3 and no move below overwrites a descriptor still needed. */
static void
child_fds(struct plan *p)
{
    STEP("dup2 stdin", move_fd(p->stdio, 0));
    STEP("dup2 stdout", move_fd(p->stdio, 1));
    if (p->err >= 0) {
        STEP("dup2 stderr", move_fd(p->err, 2));
    } else {
        long fd = syscall(SYS_openat, AT_FDCWD, "/dev/null", O_RDWR | O_CLOEXEC, 0);
        STEP("open /dev/null", fd);
        STEP("dup2 stderr", move_fd((int)fd, 2));
    }
    if (p->status >= 0)  /* last: 0, 1 and 2 already hold their copies */
        STEP("dup2 status", move_fd(p->status, 3));
    /* Everything superd opens is close-on-exec; make sure of it for what
     * anything else (a library) may have opened without. */
    syscall(SYS_close_range, p->status >= 0 ? 4 : 3, ~0U, CLOSE_RANGE_CLOEXEC);
}

static int
child_main(void *arg)
{
    struct plan *p = arg;
    unsigned char empty[KSIGSET_BYTES];

    child_signals_default();
    STEP("setsid", syscall(SYS_setsid));
    child_fds(p);
    for (int i = 0; i < p->nrlimits; i++)
        STEP("setrlimit", syscall(SYS_prlimit64, 0, p->rl_resource[i], &p->rl_value[i], NULL));
    if (p->set_nice)
        STEP("setpriority", syscall(SYS_setpriority, PRIO_PROCESS, 0, p->nice));
    if (p->set_ids) {
        STEP("setgroups", syscall(SYS_setgroups, p->ngroups, p->groups));
        STEP("setresgid", syscall(SYS_setresgid, p->gid, p->gid, p->gid));
        STEP("setresuid", syscall(SYS_setresuid, p->uid, p->uid, p->uid));
    }
    if (p->umask >= 0)
        syscall(SYS_umask, p->umask);
    if (p->cwd != NULL)
        STEP("chdir", syscall(SYS_chdir, p->cwd));
    memset(empty, 0, sizeof empty);
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, empty, NULL, KSIGSET_BYTES);
    STEP("execve", syscall(SYS_execve, p->path, p->argv, p->envp));
    return 127; /* not reached */
}

static int
ensure_stack(void)
{
    if (child_stack != NULL)
        return 0;
    char *mem = mmap(NULL, STACK_SIZE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (mem == MAP_FAILED)
        return -1;
    /* a guard page at the low end: an overflow faults instead of writing
     * into the daemon's memory */
    if (mprotect(mem, (size_t)sysconf(_SC_PAGESIZE), PROT_NONE) < 0) {
        munmap(mem, STACK_SIZE);
        return -1;
    }
    child_stack = mem;
    return 0;
}

/* Clone with every signal blocked, so that no handler of the daemon's can
 * run on the child's stack; the child unblocks after resetting them. */
static pid_t
clone_child(struct plan *p, int *pidfd)
{
    unsigned char all[KSIGSET_BYTES], old[KSIGSET_BYTES];
    memset(all, 0xff, sizeof all);
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, all, old, KSIGSET_BYTES);
    /* the stack grows down on every architecture Linux-glibc supports here */
    pid_t pid = clone(child_main, child_stack + STACK_SIZE,
                      CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD, p, pidfd);
    int saved = errno;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, old, NULL, KSIGSET_BYTES);
    errno = saved;
    return pid;
}

/* ---- argument conversion (in the daemon, before the clone) ---------- */

/* The char * of each bytes item of *seq*; *keep* receives the sequence
 * the pointers live in, which the caller holds until after the clone. */
static char **
bytes_array(PyObject *seq, const char *what, PyObject **keep)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    char **arr = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (arr == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyBytes_Check(item)
                || strlen(PyBytes_AS_STRING(item)) != (size_t)PyBytes_GET_SIZE(item)) {
            PyErr_Format(PyExc_ValueError, "%s: items must be bytes without NUL", what);
            PyMem_Free(arr);
            Py_DECREF(fast);
            return NULL;
        }
        arr[i] = PyBytes_AS_STRING(item);
    }
    *keep = fast;
    return arr;
}

static int
read_groups(PyObject *seq, gid_t **out, size_t *n)
{
    PyObject *fast = PySequence_Fast(seq, "groups");
    if (fast == NULL)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    gid_t *groups = PyMem_Calloc((size_t)len + 1, sizeof(gid_t));
    if (groups == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            PyMem_Free(groups);
            Py_DECREF(fast);
            return -1;
        }
        groups[i] = (gid_t)v;
    }
    Py_DECREF(fast);
    *out = groups;
    *n = (size_t)len;
    return 0;
}

static int
read_rlimits(PyObject *seq, struct plan *p)
{
    PyObject *fast = PySequence_Fast(seq, "rlimits");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_RLIMITS) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "too many rlimits");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int res;
        unsigned long long soft, hard;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "iKK", &res, &soft, &hard)) {
            Py_DECREF(fast);
            return -1;
        }
        p->rl_resource[i] = res;
        p->rl_value[i].rlim_cur = (rlim_t)soft;
        p->rl_value[i].rlim_max = (rlim_t)hard;
    }
    p->nrlimits = (int)n;
    Py_DECREF(fast);
    return 0;
}

/* The child failed before exec: reap it now and raise. */
static PyObject *
child_failed(struct plan *p, pid_t pid, int pidfd, PyObject *path_obj)
{
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (pidfd >= 0)
        close(pidfd);
    errno = p->failed_errno;
    PyObject *name = PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(path_obj));
    PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
    Py_XDECREF(name);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *step = PyUnicode_FromString(p->failed_step);
    if (value != NULL && step != NULL)
        PyObject_SetAttrString(value, "step", step);
    Py_XDECREF(step);
    PyErr_Restore(type, value, tb);
    return NULL;
}

PyDoc_STRVAR(spawn_doc,
"spawn(path, argv, envp, stdio, stderr, status, cwd, ids, umask, nice, rlimits)\n"
"-> (pid, pidfd)\n\n"
"Start *path* with *stdio* as fds 0 and 1, *stderr* as fd 2 (-1: /dev/null)\n"
"and *status* as fd 3 (-1: none).  Use *ids* only for root's own identity:\n"
"the daemon waits for this child's exec, so no other user may own it.\n"
"*ids* is None or (uid, gid, groups); *cwd* None or bytes; *umask* -1 keeps\n"
"the daemon's; *nice* None or an int; *rlimits* a sequence of\n"
"(resource, soft, hard).  Raises OSError with the failing step's errno and\n"
"an attribute ``step`` naming it.");

static PyObject *
spawn(PyObject *self, PyObject *args)
{
    PyObject *path_obj, *argv_obj, *envp_obj, *cwd_obj, *ids_obj, *nice_obj, *rl_obj;
    struct plan p;
    memset(&p, 0, sizeof p);
    if (!PyArg_ParseTuple(args, "O!OOiiiOOiOO", &PyBytes_Type, &path_obj, &argv_obj,
                          &envp_obj, &p.stdio, &p.err, &p.status, &cwd_obj, &ids_obj,
                          &p.umask, &nice_obj, &rl_obj))
        return NULL;
    p.path = PyBytes_AS_STRING(path_obj);
    if (cwd_obj != Py_None) {
        if (!PyBytes_Check(cwd_obj))
            return PyErr_Format(PyExc_TypeError, "cwd must be bytes or None");
        p.cwd = PyBytes_AS_STRING(cwd_obj);
    }
    if (nice_obj != Py_None) {
        p.set_nice = 1;
        p.nice = (int)PyLong_AsLong(nice_obj);
        if (p.nice == -1 && PyErr_Occurred())
            return NULL;
    }
    if (read_rlimits(rl_obj, &p) < 0)
        return NULL;

    gid_t *groups = NULL;
    char **argv = NULL, **envp = NULL;
    PyObject *result = NULL, *keep_argv = NULL, *keep_envp = NULL;
    if (ids_obj != Py_None) {
        unsigned int uid, gid;
        PyObject *groups_obj;
        if (!PyArg_ParseTuple(ids_obj, "IIO", &uid, &gid, &groups_obj))
            return NULL;
        /* The daemon waits (vfork) until this child has exec'd: a child that
         * another user owned before exec could be stopped by that user and
         * the daemon with it.  Other users go through superd-exec. */
        if (uid != 0)
            return PyErr_Format(PyExc_ValueError, "ids: only uid 0 here (use superd-exec)");
        if (gid == (unsigned int)-1)  /* "no change" to setresgid */
            return PyErr_Format(PyExc_ValueError, "gid must be below 2**32-1");
        if (read_groups(groups_obj, &groups, &p.ngroups) < 0)
            return NULL;
        p.set_ids = 1;
        p.uid = uid;
        p.gid = gid;
        p.groups = groups;
    }
    argv = bytes_array(argv_obj, "argv", &keep_argv);
    if (argv == NULL)
        goto done;
    envp = bytes_array(envp_obj, "envp", &keep_envp);
    if (envp == NULL)
        goto done;
    p.argv = argv;
    p.envp = envp;
    if (ensure_stack() < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }

    int pidfd = -1;
    pid_t pid = clone_child(&p, &pidfd);
    if (pid < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    if (p.failed_step != NULL) {
        child_failed(&p, pid, pidfd, path_obj);
        goto done;
    }
    result = Py_BuildValue("(ii)", (int)pid, pidfd);
    if (result == NULL) {  /* no memory to say so: the program must not run unwatched */
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        if (pidfd >= 0)
            close(pidfd);
    }
done:
    PyMem_Free(groups);
    PyMem_Free(argv);
    PyMem_Free(envp);
    Py_XDECREF(keep_argv);
    Py_XDECREF(keep_envp);
    return result;
}

static PyMethodDef methods[] = {
    {"spawn", spawn, METH_VARARGS, spawn_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "superd._spawn",
    "Start programs with clone(CLONE_VM|CLONE_VFORK|CLONE_PIDFD); identity "
    "changes in the child only.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__spawn(void)
{
    return PyModule_Create(&module);
}
