/* Load generator for the superd benchmark (compiled at run time by bench/).
 *
 *   loadgen conn PORT CLIENTS SECONDS [SEND [EXPECT [PER_CLIENT]]]
 *       CLIENTS processes each loop: connect, write SEND (if not ""),
 *       shutdown(SHUT_WR) if SEND was written, read to EOF, close; a
 *       connection counts as ok when EXPECT (if given) is in what came back.
 *       PER_CLIENT: stop each client after that many connections.
 *   loadgen rtt PORT CLIENTS SECONDS SIZE
 *       CLIENTS processes each hold one connection and do SIZE-byte round
 *       trips (write, read SIZE bytes back) until the time is up.
 *   loadgen bulk PORT BYTES
 *       one connection: write BYTES while reading them back (poll), then
 *       shutdown(SHUT_WR) and read to EOF; checks count and content.
 *
 * Every loop is bounded by time and by count; every socket has 10 s
 * send/receive timeouts.  Prints one JSON line: counts, errors by kind,
 * wall seconds and the generator's own CPU seconds (all its processes).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 1024
#define MAX_PER_CLIENT 50000000L

enum { E_REFUSED, E_RESET, E_TIMEOUT, E_SHORT, E_ADDR, E_OTHER, E_KINDS };
static const char *kind_names[E_KINDS] = {"refused", "reset", "timeout", "short",
                                          "addrnotavail", "other"};

struct result {
    long ok;
    long errors[E_KINDS];
    double end; /* monotonic time the worker finished */
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int kind_of(int err) {
    switch (err) {
    case ECONNREFUSED: return E_REFUSED;
    case ECONNRESET: case EPIPE: return E_RESET;
    case EAGAIN: case ETIMEDOUT: return E_TIMEOUT;
    case EADDRNOTAVAIL: return E_ADDR;
    default: return E_OTHER;
    }
}

static struct sockaddr_in target;

static int dial(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct timeval tv = {10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* One connect/read-to-EOF cycle: 0 ok, else an error kind + 1. */
static int one_conn(const char *send, size_t send_len, const char *expect) {
    char buf[4096];
    size_t got = 0;
    int fd = dial();
    if (fd < 0) return kind_of(errno) + 1;
    if (send_len > 0) {
        if (write_all(fd, send, send_len) < 0) {
            int e = errno;
            close(fd);
            return kind_of(e) + 1;
        }
        shutdown(fd, SHUT_WR);
    }
    for (;;) {
        ssize_t n = read(fd, buf + got, sizeof buf - 1 - got);
        if (n < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            close(fd);
            return kind_of(e) + 1;
        }
        if (n == 0) break;
        got += (size_t)n;
        if (got >= sizeof buf - 1) got = 0; /* only the start matters; keep reading */
    }
    close(fd);
    buf[got] = 0;
    if (expect && *expect && !strstr(buf, expect)) return E_SHORT + 1;
    return 0;
}

static long per_client = MAX_PER_CLIENT;

static void worker_conn(double deadline, const char *send, const char *expect,
                        struct result *r) {
    size_t send_len = send ? strlen(send) : 0;
    for (long i = 0; i < per_client && now() < deadline; i++) {
        int rc = one_conn(send, send_len, expect);
        if (rc == 0) r->ok++;
        else r->errors[rc - 1]++;
    }
}

static void worker_rtt(double deadline, size_t size, struct result *r) {
    char out[65536], in[65536];
    if (size > sizeof out) size = sizeof out;
    memset(out, 'x', size);
    int fd = dial();
    if (fd < 0) {
        r->errors[kind_of(errno)]++;
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    for (long i = 0; i < MAX_PER_CLIENT && now() < deadline; i++) {
        if (write_all(fd, out, size) < 0) {
            r->errors[kind_of(errno)]++;
            break;
        }
        size_t got = 0;
        while (got < size) {
            ssize_t n = read(fd, in, size - got);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                r->errors[n == 0 ? E_SHORT : kind_of(errno)]++;
                close(fd);
                return;
            }
            got += (size_t)n;
        }
        r->ok++;
    }
    close(fd);
}

static void print_result(const char *mode, struct result *total, int clients, double wall,
                         double extra_seconds) {
    struct rusage self, kids;
    getrusage(RUSAGE_SELF, &self);
    getrusage(RUSAGE_CHILDREN, &kids);
    double cpu = (double)(self.ru_utime.tv_sec + kids.ru_utime.tv_sec + self.ru_stime.tv_sec +
                          kids.ru_stime.tv_sec) +
                 (double)(self.ru_utime.tv_usec + kids.ru_utime.tv_usec +
                          self.ru_stime.tv_usec + kids.ru_stime.tv_usec) / 1e6;
    printf("{\"mode\": \"%s\", \"clients\": %d, \"ok\": %ld, \"wall\": %.6f, "
           "\"cpu\": %.6f, \"seconds\": %.6f, \"errors\": {",
           mode, clients, total->ok, wall, cpu, extra_seconds);
    for (int k = 0; k < E_KINDS; k++)
        printf("%s\"%s\": %ld", k ? ", " : "", kind_names[k], total->errors[k]);
    printf("}}\n");
}

static int run_workers(const char *mode, int clients, double seconds, const char *send,
                       const char *expect, size_t size) {
    int fds[2];
    if (pipe(fds) < 0) return 1;
    double start = now();
    double deadline = start + seconds;
    pid_t pids[MAX_CLIENTS];
    int started = 0;
    for (int c = 0; c < clients; c++) {
        pid_t pid = fork();
        if (pid < 0) break;
        if (pid == 0) {
            close(fds[0]);
            struct result r;
            memset(&r, 0, sizeof r);
            if (strcmp(mode, "rtt") == 0) worker_rtt(deadline, size, &r);
            else worker_conn(deadline, send, expect, &r);
            r.end = now();
            if (write(fds[1], &r, sizeof r) != (ssize_t)sizeof r) _exit(2);
            _exit(0);
        }
        pids[started++] = pid;
    }
    close(fds[1]);
    struct result total;
    memset(&total, 0, sizeof total);
    double end = start;
    for (int c = 0; c < started; c++) {
        struct result r;
        ssize_t n = read(fds[0], &r, sizeof r);
        if (n != (ssize_t)sizeof r) {
            total.errors[E_OTHER]++;
            continue;
        }
        total.ok += r.ok;
        for (int k = 0; k < E_KINDS; k++) total.errors[k] += r.errors[k];
        if (r.end > end) end = r.end;
    }
    for (int c = 0; c < started; c++) waitpid(pids[c], NULL, 0);
    print_result(mode, &total, started, end - start, end - start);
    return started == clients ? 0 : 1;
}

#define CHUNK (128 * 1024)

static int run_bulk(long bytes) {
    /* The pattern repeats every 256 bytes, so what comes back at stream
     * offset X must equal pattern[X % 256 ...]: one memcmp per read. */
    static char out[CHUNK + 256], in[CHUNK];
    for (size_t i = 0; i < sizeof out; i++) out[i] = (char)(i * 7 + 13);
    struct result total;
    memset(&total, 0, sizeof total);
    double start = now();
    int fd = dial();
    if (fd < 0) {
        total.errors[kind_of(errno)]++;
        print_result("bulk", &total, 1, now() - start, 0);
        return 1;
    }
    long sent = 0, recvd = 0, bad = 0;
    int wr_open = 1;
    double deadline = start + 120;
    while (now() < deadline) {
        struct pollfd p = {fd, POLLIN | (wr_open ? POLLOUT : 0), 0};
        if (poll(&p, 1, 10000) <= 0) {
            total.errors[E_TIMEOUT]++;
            break;
        }
        if (p.revents & POLLIN) {
            ssize_t n = recv(fd, in, sizeof in, MSG_DONTWAIT);
            if (n == 0) break;
            if (n < 0 && errno != EAGAIN && errno != EINTR) {
                total.errors[kind_of(errno)]++;
                break;
            }
            if (n > 0 && memcmp(in, out + recvd % 256, (size_t)n) != 0) bad++;
            if (n > 0) recvd += n;
        }
        if (wr_open && (p.revents & POLLOUT)) {
            long off = sent % 256;
            long len = CHUNK;
            if (len > bytes - sent) len = bytes - sent;
            ssize_t n = send(fd, out + off, (size_t)len, MSG_DONTWAIT);
            if (n < 0 && errno != EAGAIN && errno != EINTR) {
                total.errors[kind_of(errno)]++;
                break;
            }
            if (n > 0) sent += n;
            if (sent >= bytes) {
                shutdown(fd, SHUT_WR);
                wr_open = 0;
            }
        }
        if (p.revents & (POLLERR | POLLHUP) && !(p.revents & POLLIN)) {
            total.errors[E_RESET]++;
            break;
        }
    }
    close(fd);
    double wall = now() - start;
    if (recvd == bytes && bad == 0) total.ok = 1;
    else total.errors[E_SHORT]++;
    print_result("bulk", &total, 1, wall, wall);
    return total.ok ? 0 : 1;
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen conn PORT CLIENTS SECONDS [SEND [EXPECT [PER_CLIENT]]]\n"
                    "       loadgen rtt PORT CLIENTS SECONDS SIZE\n"
                    "       loadgen bulk PORT BYTES\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 4) usage();
    signal(SIGPIPE, SIG_IGN);
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[2]));
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strcmp(argv[1], "bulk") == 0) return run_bulk(atol(argv[3]));
    if (argc < 5) usage();
    int clients = atoi(argv[3]);
    double seconds = atof(argv[4]);
    if (clients < 1 || clients > MAX_CLIENTS || seconds <= 0 || seconds > 600) usage();
    if (argc > 7) per_client = atol(argv[7]);
    if (per_client < 1 || per_client > MAX_PER_CLIENT) usage();
    if (strcmp(argv[1], "conn") == 0)
        return run_workers("conn", clients, seconds, argc > 5 ? argv[5] : NULL,
                           argc > 6 ? argv[6] : NULL, 0);
    if (strcmp(argv[1], "rtt") == 0 && argc > 5)
        return run_workers("rtt", clients, seconds, NULL, NULL, (size_t)atol(argv[5]));
    usage();
    return 2;
}
