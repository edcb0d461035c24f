/* A native measuring client for bench/stream.py: a fixed-rate NATS publisher and a subscriber
 * that time-stamp each feature at its write() and each signal at the read() that brought it.
 *
 * Why native: the Python client (nats-py on uvloop) spends ~0.18 of a vCPU at 1,000 msg/s on
 * the same two cores as the worker, the broker and the database (this one ~0.045), and its
 * stamps sit behind its
 * own flusher task (send) and its parser and dispatch (receipt). This one sleeps on
 * clock_nanosleep between sends and blocks in read(): it measures the path between the
 * socket writes and reads that the stream's latency is defined by.
 *
 *   pacer HOST PORT RATE SUBSCRIBE FRAMES SENDS_OUT RECEIVED_OUT EXPECTED [TIMEOUT_S]
 *
 * FRAMES holds the NATS wire frames to send, one after another ("PUB subject n\r\n" + payload
 * + "\r\n"), encoded by the caller. SENDS_OUT gets one int64 per frame (CLOCK_MONOTONIC ns of
 * its write, which is Python's time.perf_counter on Linux) and then one int64 per frame of its
 * lateness against the schedule (ns). RECEIVED_OUT gets, per message delivered on SUBSCRIBE,
 * int64 receipt ns, int32 payload length, the payload. The client prints "ready" once both
 * connections are set up and the subscription is confirmed, waits for a line on stdin, paces,
 * waits until EXPECTED messages came or TIMEOUT_S (30) passed after the last send, writes the
 * files and prints "done <sent> <received>". Exit status 2 on a usage error, 1 on any failure. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define CONNECT_LINE "CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"lang\":\"c\"," \
                     "\"version\":\"1\",\"protocol\":1,\"name\":\"sigserve-bench-pacer\"}\r\n"

static void die(const char *what) {
    fprintf(stderr, "pacer: %s: %s\n", what, errno ? strerror(errno) : "failed");
    exit(1);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        data += n;
        len -= (size_t)n;
    }
}

/* A growable byte buffer. */
typedef struct {
    char *data;
    size_t len, cap;
} Buf;

static void buf_reserve(Buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->len + extra) cap *= 2;
    b->data = realloc(b->data, cap);
    if (!b->data) die("out of memory");
    b->cap = cap;
}

static void buf_append(Buf *b, const void *data, size_t len) {
    buf_reserve(b, len);
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

static int dial(const char *host, const char *port) {
    struct addrinfo hints = {0}, *res;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &res) != 0) die("getaddrinfo");
    int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
    if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen) < 0) die("connect");
    freeaddrinfo(res);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* One connection's reader: a buffer of what was read and not yet parsed. */
typedef struct {
    int fd;
    Buf in;
    size_t at; /* parse position in `in` */
} Conn;

/* Read more bytes; returns the count (0 on a timeout of SO_RCVTIMEO). */
static ssize_t conn_fill(Conn *c) {
    if (c->at > 0) { /* keep only what is not parsed yet */
        memmove(c->in.data, c->in.data + c->at, c->in.len - c->at);
        c->in.len -= c->at;
        c->at = 0;
    }
    buf_reserve(&c->in, 1 << 16);
    ssize_t n = read(c->fd, c->in.data + c->in.len, c->in.cap - c->in.len);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
        die("read");
    }
    if (n == 0) {
        errno = 0;
        die("the server closed the connection");
    }
    c->in.len += (size_t)n;
    return n;
}

/* The next complete control line (without CRLF) or NULL when more bytes are needed. */
static char *conn_line(Conn *c, size_t *line_len) {
    char *start = c->in.data + c->at;
    char *end = memmem(start, c->in.len - c->at, "\r\n", 2);
    if (!end) return NULL;
    *line_len = (size_t)(end - start);
    return start;
}

/* A control line other than MSG/HMSG: PING is answered, -ERR is fatal, INFO/+OK/PONG skipped. */
static void conn_control(Conn *c, const char *line, size_t len) {
    if (len >= 4 && memcmp(line, "PING", 4) == 0) write_all(c->fd, "PONG\r\n", 6);
    if (len >= 4 && memcmp(line, "-ERR", 4) == 0) {
        fprintf(stderr, "pacer: server error: %.*s\n", (int)len, line);
        exit(1);
    }
}

/* Wait for PONG on a connection (the server has taken everything sent before the PING). */
static void conn_await_pong(Conn *c) {
    for (;;) {
        size_t len;
        char *line;
        while ((line = conn_line(c, &len)) != NULL) {
            c->at += len + 2;
            if (len >= 4 && memcmp(line, "PONG", 4) == 0) return;
            conn_control(c, line, len);
        }
        conn_fill(c);
    }
}

static void conn_open(Conn *c, const char *host, const char *port) {
    memset(c, 0, sizeof *c);
    c->fd = dial(host, port);
    write_all(c->fd, CONNECT_LINE, strlen(CONNECT_LINE));
}

/* The subscriber thread's state. */
typedef struct {
    Conn conn;
    Buf out;               /* receipt records */
    atomic_long received;
    atomic_int stop;
} Subscriber;

/* Parse every complete MSG/HMSG in the buffer, stamping each with `stamp`. */
static void subscriber_parse(Subscriber *s, int64_t stamp) {
    Conn *c = &s->conn;
    for (;;) {
        size_t len;
        char *line = conn_line(c, &len);
        if (!line) return;
        int is_msg = len > 4 && memcmp(line, "MSG ", 4) == 0;
        int is_hmsg = len > 5 && memcmp(line, "HMSG ", 5) == 0;
        if (!is_msg && !is_hmsg) {
            c->at += len + 2;
            conn_control(c, line, len);
            continue;
        }
        /* MSG <subject> <sid> [reply] <total>; HMSG <subject> <sid> [reply] <hdr> <total> */
        char *p = line + len;
        while (p > line && p[-1] != ' ') p--;
        size_t total = strtoull(p, NULL, 10);
        size_t headers = 0;
        if (is_hmsg) {
            char *q = p - 1;
            while (q > line && q[-1] != ' ') q--;
            headers = strtoull(q, NULL, 10);
        }
        size_t frame = len + 2 + total + 2;
        if (c->in.len - c->at < frame) return; /* the payload is not all here yet */
        const char *payload = line + len + 2 + headers;
        int32_t body = (int32_t)(total - headers);
        buf_append(&s->out, &stamp, sizeof stamp);
        buf_append(&s->out, &body, sizeof body);
        buf_append(&s->out, payload, (size_t)body);
        c->at += frame;
        atomic_fetch_add(&s->received, 1);
    }
}

static void *subscriber_run(void *arg) {
    Subscriber *s = arg;
    while (!atomic_load(&s->stop)) {
        if (conn_fill(&s->conn) > 0) subscriber_parse(s, now_ns());
    }
    return NULL;
}

static void save(const char *path, const void *a, size_t alen, const void *b, size_t blen) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(a, 1, alen, f) != alen || (blen && fwrite(b, 1, blen, f) != blen) || fclose(f) != 0)
        die(path);
}

int main(int argc, char **argv) {
    if (argc < 9) {
        fprintf(stderr, "usage: pacer HOST PORT RATE SUBSCRIBE FRAMES SENDS_OUT RECEIVED_OUT EXPECTED [TIMEOUT_S]\n");
        return 2;
    }
    const char *host = argv[1], *port = argv[2], *subject = argv[4];
    double rate = atof(argv[3]);
    long expected = atol(argv[8]);
    double timeout_s = argc > 9 ? atof(argv[9]) : 30.0;
    if (rate <= 0) {
        fprintf(stderr, "pacer: RATE must be positive\n");
        return 2;
    }

    /* the frames, and where each starts */
    FILE *f = fopen(argv[5], "rb");
    if (!f) die(argv[5]);
    Buf frames = {0};
    char chunk[1 << 16];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) buf_append(&frames, chunk, n);
    fclose(f);
    size_t count = 0, cap = 1024;
    size_t *starts = malloc(cap * sizeof *starts);
    for (size_t at = 0; at < frames.len;) {
        char *eol = memmem(frames.data + at, frames.len - at, "\r\n", 2);
        if (!eol || memcmp(frames.data + at, "PUB ", 4) != 0) {
            fprintf(stderr, "pacer: FRAMES is not a sequence of PUB frames (at byte %zu)\n", at);
            return 2;
        }
        char *p = eol;
        while (p[-1] != ' ') p--;
        size_t payload = strtoull(p, NULL, 10);
        if (count == cap) starts = realloc(starts, (cap *= 2) * sizeof *starts);
        starts[count++] = at;
        at = (size_t)(eol - frames.data) + 2 + payload + 2;
    }
    if (count == 0) {
        fprintf(stderr, "pacer: FRAMES holds no frame\n");
        return 2;
    }
    if (count == cap) starts = realloc(starts, (cap + 1) * sizeof *starts);
    starts[count] = frames.len;

    Subscriber sub = {0};
    conn_open(&sub.conn, host, port);
    char line[1024];
    int w = snprintf(line, sizeof line, "SUB %s 1\r\nPING\r\n", subject);
    write_all(sub.conn.fd, line, (size_t)w);
    conn_await_pong(&sub.conn);
    struct timeval tick = {.tv_sec = 0, .tv_usec = 100000}; /* lets the thread see `stop` */
    setsockopt(sub.conn.fd, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof tick);
    subscriber_parse(&sub, now_ns()); /* anything that came with the PONG */

    Conn pub;
    conn_open(&pub, host, port);
    write_all(pub.fd, "PING\r\n", 6);
    conn_await_pong(&pub);

    pthread_t thread;
    if (pthread_create(&thread, NULL, subscriber_run, &sub) != 0) die("pthread_create");
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) die("no go line on stdin");

    int64_t *sent = calloc(count, sizeof *sent), *late = calloc(count, sizeof *late);
    if (!sent || !late) die("out of memory");
    prctl(PR_SET_TIMERSLACK, 1UL); /* wake at the due time, not up to 50 us after it */
    int64_t period = (int64_t)(1e9 / rate), began = now_ns();
    for (size_t k = 0; k < count; k++) {
        int64_t due = began + (int64_t)k * period;
        if (due - now_ns() > 20000) {
            struct timespec at = {.tv_sec = due / 1000000000LL, .tv_nsec = due % 1000000000LL};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL) == EINTR) {
            }
        }
        int64_t t;
        while ((t = now_ns()) < due) {
            /* the last microseconds, where a sleep would overshoot: never send early */
        }
        sent[k] = t;
        late[k] = t - due;
        write_all(pub.fd, frames.data + starts[k], starts[k + 1] - starts[k]);
    }
    int64_t deadline = now_ns() + (int64_t)(timeout_s * 1e9);
    struct timespec poll = {.tv_sec = 0, .tv_nsec = 5000000};
    while (atomic_load(&sub.received) < expected && now_ns() < deadline) nanosleep(&poll, NULL);
    atomic_store(&sub.stop, 1);
    pthread_join(thread, NULL);

    save(argv[6], sent, count * sizeof *sent, late, count * sizeof *late);
    save(argv[7], sub.out.data ? sub.out.data : "", sub.out.len, NULL, 0);
    printf("done %zu %ld\n", count, (long)atomic_load(&sub.received));
    fflush(stdout);
    return 0;
}
