/* The floor: the least work an exec-per-connection server can do, written
 * only to measure superd and its peers against (compiled at run time).
 *
 *   floor [-u UID -g GID] exec PORT[,PORT...] PROGRAM [ARGS...] [--- PORTS PROGRAM ARGS...]
 *   floor echo PORT
 *
 * exec: accept4 each connection on 127.0.0.1:PORT and posix_spawn PROGRAM
 * with the socket dup2'd onto fds 0 and 1; children are reaped with
 * waitpid(WNOHANG) after a SIGCHLD.  With one port it blocks in accept4;
 * with several it waits in epoll.  "---" starts another group of ports
 * with its own program.  -u/-g: the programs run as UID/GID
 * (the server keeps effective uid 0 and sets its real ids once, so that
 * POSIX_SPAWN_RESETIDS hands the real ids to each program).
 * echo: an in-process RFC 862 echo server (epoll, non-blocking).
 * Runs until SIGTERM.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <grp.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static volatile sig_atomic_t child_exited, stop;

static void on_chld(int sig) { (void)sig; child_exited = 1; }
static void on_term(int sig) { (void)sig; stop = 1; }

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int listen_on(int port, int nonblock) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    return fd;
}

static void reap(void) {
    child_exited = 0;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

static posix_spawnattr_t attr;

static void spawn_on(int conn, char **argv) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, conn, 0);
    posix_spawn_file_actions_adddup2(&fa, conn, 1);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, &attr, argv, environ);
    if (rc != 0) fprintf(stderr, "floor: posix_spawn: %s\n", strerror(rc));
    posix_spawn_file_actions_destroy(&fa);
    close(conn);
}

#define MAX_LISTENERS 2048
static int lfds[MAX_LISTENERS];
static char **progs[MAX_LISTENERS];

static int run_exec(char **args) {
    int n = 0;
    while (*args) {
        char *ports = *args++;
        char **prog = args;
        while (*args && strcmp(*args, "---") != 0) args++;
        if (*args) *args++ = NULL; /* terminate this group's argv */
        if (!prog[0]) {
            fprintf(stderr, "floor: no program after %s\n", ports);
            return 2;
        }
        for (char *p = strtok(ports, ","); p && n < MAX_LISTENERS; p = strtok(NULL, ",")) {
            progs[n] = prog;
            lfds[n++] = listen_on(atoi(p), 0);
        }
    }
    if (n == 1) {
        for (;;) {
            if (child_exited) reap();
            if (stop) return 0;
            int conn = accept4(lfds[0], NULL, NULL, SOCK_CLOEXEC);
            if (conn < 0) {
                if (errno == EINTR || errno == ECONNABORTED) continue;
                perror("accept4");
                usleep(100000);
                continue;
            }
            spawn_on(conn, progs[0]);
        }
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < n; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, lfds[i], &ev) < 0) die("epoll_ctl");
    }
    struct epoll_event evs[64];
    for (;;) {
        if (child_exited) reap();
        if (stop) return 0;
        int k = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < k; i++) {
            int l = (int)evs[i].data.u32;
            int conn = accept4(lfds[l], NULL, NULL, SOCK_CLOEXEC);
            if (conn >= 0) spawn_on(conn, progs[l]);
        }
    }
}

static int run_echo(int port) {
    int lfd = listen_on(port, 1);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0) die("epoll_ctl");
    struct epoll_event evs[256];
    static char buf[65536];
    while (!stop) {
        int k = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (int j = 0; j < 64; j++) {
                    int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                    if (c < 0) break;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) {
                close(fd); /* also leaves the epoll set */
                continue;
            }
            ssize_t off = 0;
            while (off < r) { /* a slow reader blocks the floor: fine for a floor */
                ssize_t w = write(fd, buf + off, (size_t)(r - off));
                if (w > 0) off += w;
                else if (w < 0 && errno == EAGAIN) usleep(100);
                else break;
            }
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    int opt, uid = -1, gid = -1;
    while ((opt = getopt(argc, argv, "+u:g:")) != -1) {
        if (opt == 'u') uid = atoi(optarg);
        else if (opt == 'g') gid = atoi(optarg);
        else return 2;
    }
    argc -= optind;
    argv += optind;
    if (argc < 2) {
        fprintf(stderr, "usage: floor [-u UID -g GID] exec PORTS PROGRAM [ARGS...] | echo PORT\n");
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_chld; /* no SA_RESTART: accept4 returns EINTR */
    sigaction(SIGCHLD, &sa, NULL);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (strcmp(argv[0], "echo") == 0) return run_echo(atoi(argv[1]));
    if (strcmp(argv[0], "exec") != 0 || argc < 3) return 2;
    if (uid >= 0) {
        gid_t g = (gid_t)(gid >= 0 ? gid : uid);
        if (setgroups(1, &g) < 0 || setresgid(g, 0, 0) < 0 || setresuid((uid_t)uid, 0, 0) < 0)
            die("setting real ids");
    }
    /* SIGPIPE back to default in the programs (the floor ignores it);
     * RESETIDS gives them the real ids set above. */
    sigset_t def;
    sigemptyset(&def);
    sigaddset(&def, SIGPIPE);
    posix_spawnattr_init(&attr);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | (uid >= 0 ? POSIX_SPAWN_RESETIDS : 0));
    posix_spawnattr_setsigdefault(&attr, &def);
    return run_exec(argv + 1);
}
