/*
 * superd-exec: the last step of starting a program as another user.
 *
 *     superd-exec UID GID GROUPS CWD -- PROGRAM ARGV0 ARG...
 *
 * superd's spawn child (which shares the daemon's memory and runs as root,
 * so that no other user can stop it while the daemon waits for its exec)
 * has already set everything that needs root or must hold across exec:
 * signals, session, descriptors, rlimits, nice, umask.  It then execs this
 * small program, which is a process of its own: it switches to GROUPS
 * (comma-separated, may be empty), GID and UID, goes to CWD ("" stays in /,
 * checked as the new user), and execs PROGRAM with ARGV0 ARG....
 *
 * Nothing the new user does to this process can reach the daemon: it does
 * not share the daemon's memory and the daemon does not wait for it.
 *
 * A failure is reported on descriptor 3 (a pipe the daemon reads, close-on-
 * exec here, so a program never inherits it) as "ERRNO STEP\n", and the
 * process exits 127.
 *
 * It runs once per connection, so on x86-64 and AArch64 it is built without
 * the C library (-nostdlib, raw system calls): a static glibc program costs
 * about 450 us more to start, measured here.  Elsewhere it uses libc.
 */

#define STATUS_FD 3
#define MAX_GROUPS 65536

#if defined(__x86_64__) || defined(__aarch64__)
#define NOLIBC 1
#endif

#ifdef NOLIBC

#if defined(__x86_64__)
#define NR_WRITE 1
#define NR_FCNTL 72
#define NR_CHDIR 80
#define NR_EXECVE 59
#define NR_SETRESUID 117
#define NR_SETRESGID 119
#define NR_SETGROUPS 116
#define NR_EXIT_GROUP 231

static long
sys3(long n, long a, long b, long c)
{
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return ret;
}

__asm__(".text\n.global _start\n_start:\n"
        "  xor %rbp, %rbp\n  mov %rsp, %rdi\n  and $-16, %rsp\n"
        "  call start_c\n  hlt\n");
#else /* __aarch64__ */
#define NR_WRITE 64
#define NR_FCNTL 25
#define NR_CHDIR 49
#define NR_EXECVE 221
#define NR_SETRESUID 147
#define NR_SETRESGID 149
#define NR_SETGROUPS 159
#define NR_EXIT_GROUP 94

static long
sys3(long n, long a, long b, long c)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
    return x0;
}

__asm__(".text\n.global _start\n_start:\n"
        "  mov x0, sp\n  bl start_c\n  brk #0\n");
#endif

#define F_SETFD 2
#define FD_CLOEXEC 1
#define EINVAL 22

typedef unsigned int id32;

/* On failure the raw calls return -errno. */
#define CALL(n, a, b, c) sys3((n), (long)(a), (long)(b), (long)(c))

static void __attribute__((noreturn))
fail(long err, const char *step)
{
    char line[48];
    int n = 0;
    char digits[12];
    int d = 0;
    unsigned long e = (unsigned long)(err < 0 ? -err : err);
    do {
        digits[d++] = (char)('0' + e % 10);
        e /= 10;
    } while (e && d < 11);
    while (d)
        line[n++] = digits[--d];
    line[n++] = ' ';
    for (const char *s = step; *s && n < 46; s++)
        line[n++] = *s;
    line[n++] = '\n';
    CALL(NR_WRITE, STATUS_FD, line, n);
    CALL(NR_EXIT_GROUP, 127, 0, 0);
    for (;;)
        ;
}

static int
parse_id(const char *s, const char *end, id32 *out)
{
    unsigned long v = 0;
    if (s == end)
        return -1;
    for (; s < end; s++) {
        if (*s < '0' || *s > '9' || v > 0xffffffffUL / 10)
            return -1;
        v = v * 10 + (unsigned long)(*s - '0');
    }
    if (v >= 0xffffffffUL)  /* (id32)-1 means "no change" to the kernel */
        return -1;
    *out = (id32)v;
    return 0;
}

static const char *
end_of(const char *s)
{
    while (*s)
        s++;
    return s;
}

static id32 groups[MAX_GROUPS];

static long
parse_groups(const char *s)
{
    long n = 0;
    while (*s) {
        const char *e = s;
        while (*e && *e != ',')
            e++;
        if (n == MAX_GROUPS || parse_id(s, e, &groups[n]) < 0)
            fail(EINVAL, "groups");
        n++;
        s = *e ? e + 1 : e;
    }
    return n;
}

static int
same(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

void __attribute__((noreturn, used))
start_c(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    char **envp = argv + argc + 1;
    id32 uid, gid;
    long r;

    if (CALL(NR_FCNTL, STATUS_FD, F_SETFD, FD_CLOEXEC) < 0)
        CALL(NR_EXIT_GROUP, 127, 0, 0);  /* not run by superd */
    if (argc < 8 || !same(argv[5], "--") || parse_id(argv[1], end_of(argv[1]), &uid) < 0
            || parse_id(argv[2], end_of(argv[2]), &gid) < 0)
        fail(EINVAL, "arguments");
    long ngroups = parse_groups(argv[3]);
    if ((r = CALL(NR_SETGROUPS, ngroups, groups, 0)) < 0)
        fail(r, "setgroups");
    if ((r = CALL(NR_SETRESGID, gid, gid, gid)) < 0)
        fail(r, "setresgid");
    if ((r = CALL(NR_SETRESUID, uid, uid, uid)) < 0)
        fail(r, "setresuid");
    if (argv[4][0] != '\0' && (r = CALL(NR_CHDIR, argv[4], 0, 0)) < 0)
        fail(r, "chdir");
    r = CALL(NR_EXECVE, argv[6], argv + 7, envp);
    fail(r, "execve");
}

#else /* with the C library */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static void
fail(const char *step)
{
    char line[64];
    int n = snprintf(line, sizeof line, "%d %s\n", errno, step);
    if (n > 0 && write(STATUS_FD, line, (size_t)n) < 0) {
        /* nobody to tell: the exit status says it */
    }
    _exit(127);
}

static int
parse_id(const char *text, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v >= 0xffffffffUL)
        return -1;
    *out = v;
    return 0;
}

static gid_t groups[MAX_GROUPS];

int
main(int argc, char **argv)
{
    unsigned long uid, gid, v;
    size_t n = 0;
    if (fcntl(STATUS_FD, F_SETFD, FD_CLOEXEC) < 0)
        return 127;
    if (argc < 8 || strcmp(argv[5], "--") != 0 || parse_id(argv[1], &uid) < 0
            || parse_id(argv[2], &gid) < 0) {
        errno = EINVAL;
        fail("arguments");
    }
    for (char *save = NULL, *tok = strtok_r(argv[3], ",", &save); tok != NULL;
         tok = strtok_r(NULL, ",", &save)) {
        if (n == MAX_GROUPS || parse_id(tok, &v) < 0) {
            errno = EINVAL;
            fail("groups");
        }
        groups[n++] = (gid_t)v;
    }
    if (setgroups(n, groups) < 0)
        fail("setgroups");
    if (setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) < 0)
        fail("setresgid");
    if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) < 0)
        fail("setresuid");
    if (argv[4][0] != '\0' && chdir(argv[4]) < 0)
        fail("chdir");
    execve(argv[6], argv + 7, environ);
    fail("execve");
    return 127;
}

#endif
