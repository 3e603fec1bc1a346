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
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define STATUS_FD 3
#define MAX_GROUPS 65536

static void
fail(const char *step)
{
    int err = errno;
    char line[64];
    int n = snprintf(line, sizeof line, "%d %s\n", err, step);
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

static size_t
parse_groups(char *text)
{
    size_t n = 0;
    for (char *save = NULL, *tok = strtok_r(text, ",", &save); tok != NULL;
         tok = strtok_r(NULL, ",", &save)) {
        unsigned long v;
        if (n == MAX_GROUPS || parse_id(tok, &v) < 0) {
            errno = EINVAL;
            fail("groups");
        }
        groups[n++] = (gid_t)v;
    }
    return n;
}

int
main(int argc, char **argv)
{
    unsigned long uid, gid;
    if (fcntl(STATUS_FD, F_SETFD, FD_CLOEXEC) < 0) {
        fputs("superd-exec: run by superd only\n", stderr);
        return 127;
    }
    if (argc < 8 || strcmp(argv[5], "--") != 0 || parse_id(argv[1], &uid) < 0
            || parse_id(argv[2], &gid) < 0) {
        errno = EINVAL;
        fail("arguments");
    }
    size_t ngroups = parse_groups(argv[3]);
    if (setgroups(ngroups, groups) < 0)
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
