/* The stamp relay's loop written out in C, for speed: the same process, protocol and rules
 * as `handlers/ingest/relay_process.py`, which is the plain version and says why each rule
 * is as it is. `tests/test_relay.py` runs every relay test against both, and
 * `tests/test_fastpath.py` relays the same writes through both and compares their records.
 *
 * Why it exists: a relay wakes once an arrival (that keeps each stamp its own bytes'
 * arrival time), and at the loads most users run a wake-up is the relay's whole cost.
 * A wake-up of this loop costs about a third of the Python one's, and the process is
 * ~2 MiB resident instead of ~11 (BENCHMARKS.md, "Per read, fourth round").
 *
 * Built by scripts/build-relay.sh into the virtual environment's bin/ (next to its
 * python); the collector runs it when it is there and the Python loop otherwise.
 *
 * argv: the control socket's fd, the process's name, the forwarding interval in seconds.
 * The control socket (SOCK_SEQPACKET) brings one message per connection, with two fds:
 * the TCP socket (shared with the collector, read only here, its flags left alone) and
 * the relay's end of a unix socketpair, through which go records `<q stamp_us><I n>` and
 * n bytes, little-endian; n == 0 ends the stream: stamp 0 for the peer's close, minus the
 * errno of a failed read. "r" on the control socket says the relay is ready; the control
 * socket's end says the collector is gone, and the relay exits. */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* the constants of relay_process.py (tests/test_fastpath.py reads them from here) */
#define READ_SIZE (1 << 16)
#define HOLD_LIMIT (4 << 20)
#define FORWARD_BYTES (1 << 16)
#define EAGER_READS 8
#define RECORD_SIZE 12
#define MAX_EVENTS 256

#ifndef SCM_TIMESTAMPNS
#define SCM_TIMESTAMPNS 35 /* SO_TIMESTAMPNS_OLD, as handlers/ingest/timestamps.py */
#endif

struct conn {
    int tcp, pipe;
    char *out;            /* records not yet forwarded: out[sent..len) */
    size_t len, sent, cap;
    int writable_wait;    /* the pair was full: waiting for EPOLLOUT */
    int reading;          /* the TCP socket is in the epoll set */
    int ended;            /* the end record is queued */
    int eager;            /* reads still forwarded at once (the handshakes) */
    int waiting;          /* in the list of connections with records not yet sent */
    struct conn *prev, *next;
};

/* what an fd is: every connection has two, the control socket none (slot NULL) */
struct slot {
    struct conn *conn;
    int is_tcp;
};

static int ep, ctrl;
static double forward_after;
static struct slot *slots;
static size_t nslots;
static struct conn *wait_head, *wait_tail;
static double due;

static void *checked(void *p) {
    if (p == NULL) {
        perror("stamp relay: out of memory");
        exit(1);
    }
    return p;
}

static double monotonic(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int64_t wall_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

/* relay_process.next_forward: the next multiple of the interval of the monotonic clock */
static double next_forward(double now) { return (floor(now / forward_after) + 1) * forward_after; }

static void set_slot(int fd, struct conn *c, int is_tcp) {
    if ((size_t)fd >= nslots) {
        size_t n = nslots ? nslots : 64;
        while (n <= (size_t)fd) n *= 2;
        slots = checked(realloc(slots, n * sizeof *slots));
        memset(slots + nslots, 0, (n - nslots) * sizeof *slots);
        nslots = n;
    }
    slots[fd].conn = c;
    slots[fd].is_tcp = is_tcp;
}

static void watch(int op, int fd, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)fd};
    epoll_ctl(ep, op, fd, &ev);
}

static void wait_add(struct conn *c) {
    if (c->waiting) return;
    if (wait_head == NULL) due = next_forward(monotonic());
    c->waiting = 1;
    c->prev = wait_tail;
    c->next = NULL;
    if (wait_tail) wait_tail->next = c; else wait_head = c;
    wait_tail = c;
}

static void wait_remove(struct conn *c) {
    if (!c->waiting) return;
    if (c->prev) c->prev->next = c->next; else wait_head = c->next;
    if (c->next) c->next->prev = c->prev; else wait_tail = c->prev;
    c->waiting = 0;
    c->prev = c->next = NULL;
}

/* room for `more` bytes after the records already queued */
static void reserve(struct conn *c, size_t more) {
    if (c->sent > 0 && c->len + more > c->cap) { /* move the unsent part to the front first */
        memmove(c->out, c->out + c->sent, c->len - c->sent);
        c->len -= c->sent;
        c->sent = 0;
    }
    if (c->len + more > c->cap) {
        size_t cap = c->cap ? c->cap : 2 * (RECORD_SIZE + READ_SIZE);
        while (cap < c->len + more) cap *= 2;
        c->out = checked(realloc(c->out, cap));
        c->cap = cap;
    }
}

static void put_header(char *at, int64_t stamp, uint32_t n) {
    uint64_t s = htole64((uint64_t)stamp);
    uint32_t k = htole32(n);
    memcpy(at, &s, 8);
    memcpy(at + 8, &k, 4);
}

static void drop(struct conn *c) {
    wait_remove(c);
    if (c->reading) epoll_ctl(ep, EPOLL_CTL_DEL, c->tcp, NULL);
    epoll_ctl(ep, EPOLL_CTL_DEL, c->pipe, NULL);
    set_slot(c->tcp, NULL, 0);
    set_slot(c->pipe, NULL, 0);
    close(c->tcp);
    close(c->pipe);
    free(c->out);
    free(c);
}

/* relay_process._Relay._forward: send what waits, as much as the pair takes; the rest
 * waits for EPOLLOUT (and past HOLD_LIMIT the TCP socket is no longer read) */
static void forward(struct conn *c) {
    wait_remove(c);
    while (c->sent < c->len) {
        ssize_t n = send(c->pipe, c->out + c->sent, c->len - c->sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                drop(c);
                return;
            }
            if (!c->writable_wait) {
                watch(EPOLL_CTL_MOD, c->pipe, EPOLLIN | EPOLLOUT);
                c->writable_wait = 1;
            }
            if (c->len - c->sent > HOLD_LIMIT && c->reading) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->tcp, NULL); /* TCP back-pressure until the collector reads again */
                c->reading = 0;
            }
            return;
        }
        c->sent += (size_t)n;
    }
    c->sent = c->len = 0;
    if (c->cap > 4 * (RECORD_SIZE + READ_SIZE)) { /* what a reader that fell behind left: not kept */
        free(c->out);
        c->out = NULL;
        c->cap = 0;
    }
    if (c->writable_wait) {
        watch(EPOLL_CTL_MOD, c->pipe, EPOLLIN);
        c->writable_wait = 0;
    }
    if (c->ended) {
        drop(c);
    } else if (!c->reading) {
        watch(EPOLL_CTL_ADD, c->tcp, EPOLLIN);
        c->reading = 1;
    }
}

/* relay_process._Relay._end: the connection's last record, forwarded at once */
static void end(struct conn *c, int64_t code) {
    if (c->reading) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->tcp, NULL);
        c->reading = 0;
    }
    c->ended = 1;
    reserve(c, RECORD_SIZE);
    put_header(c->out + c->len, code, 0);
    c->len += RECORD_SIZE;
    forward(c);
}

/* the loop's common case (relay_process._Relay.run): read what arrived, with its stamp,
 * straight into the connection's queue of records */
static void read_tcp(struct conn *c) {
    char control[CMSG_SPACE(sizeof(struct timespec))];
    reserve(c, RECORD_SIZE + READ_SIZE);
    struct iovec iov = {.iov_base = c->out + c->len + RECORD_SIZE, .iov_len = READ_SIZE};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t n = recvmsg(c->tcp, &msg, MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return; /* not ready after all */
        end(c, -(int64_t)(errno ? errno : EIO)); /* this error, not the end a second read would see */
        return;
    }
    if (n == 0) {
        end(c, 0);
        return;
    }
    int64_t stamp = 0;
    int stamped = 0;
    for (struct cmsghdr *m = CMSG_FIRSTHDR(&msg); m != NULL; m = CMSG_NXTHDR(&msg, m)) {
        if (m->cmsg_level == SOL_SOCKET && m->cmsg_type == SCM_TIMESTAMPNS
            && m->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
            struct timespec t;
            memcpy(&t, CMSG_DATA(m), sizeof t);
            stamp = (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
            stamped = 1;
            break;
        }
    }
    if (!stamped) stamp = wall_us(); /* the clock now, as timestamps.stamp_of */
    put_header(c->out + c->len, stamp, (uint32_t)n);
    c->len += RECORD_SIZE + (size_t)n;
    if (c->len - c->sent >= FORWARD_BYTES || c->eager > 0) {
        if (c->eager > 0) c->eager--;
        forward(c);
    } else {
        wait_add(c);
    }
}

/* relay_process._Relay._accept: 0 when the collector is gone */
static int accept_conn(void) {
    char byte;
    char control[CMSG_SPACE(2 * sizeof(int))];
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t n = recvmsg(ctrl, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) return 1;
        perror("stamp relay: control socket");
        exit(1);
    }
    if (n == 0) return 0;
    int fds[2], got = 0;
    for (struct cmsghdr *m = CMSG_FIRSTHDR(&msg); m != NULL; m = CMSG_NXTHDR(&msg, m)) {
        if (m->cmsg_level == SOL_SOCKET && m->cmsg_type == SCM_RIGHTS) {
            size_t k = (m->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < k; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(m) + i * sizeof(int), sizeof fd);
                if (got < 2) fds[got++] = fd; else close(fd);
            }
        }
    }
    if (got < 2) { /* not a connection: the collector never sends that */
        fprintf(stderr, "stamp relay: a control message without its two sockets\n");
        for (int i = 0; i < got; i++) close(fds[i]);
        return 1;
    }
    struct conn *c = checked(calloc(1, sizeof *c));
    c->tcp = fds[0];
    c->pipe = fds[1];
    c->reading = 1;
    c->eager = EAGER_READS;
    set_slot(c->tcp, c, 1);
    set_slot(c->pipe, c, 0);
    watch(EPOLL_CTL_ADD, c->tcp, EPOLLIN);
    watch(EPOLL_CTL_ADD, c->pipe, EPOLLIN);
    return 1;
}

/* the collector never writes to its end of the pair: readable means closed */
static int collector_open(struct conn *c) {
    char byte;
    ssize_t n = recv(c->pipe, &byte, 1, MSG_DONTWAIT);
    if (n > 0) return 1;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s CONTROL_FD NAME FORWARD_AFTER\n", argv[0]);
        return 2;
    }
    ctrl = atoi(argv[1]);
    forward_after = strtod(argv[3], NULL);
    if (forward_after <= 0) {
        fprintf(stderr, "stamp relay: FORWARD_AFTER must be > 0, not %s\n", argv[3]);
        return 2;
    }
    prctl(PR_SET_NAME, argv[2], 0, 0, 0); /* its name in top and ps (15 bytes kept) */
    /* systemd's SIGTERM reaches every process of the unit: the relay outlives the readers
     * it serves and ends when the collector closes the control socket */
    signal(SIGTERM, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("stamp relay: epoll");
        return 1;
    }
    watch(EPOLL_CTL_ADD, ctrl, EPOLLIN);
    if (send(ctrl, "r", 1, MSG_NOSIGNAL) != 1) return 1;
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int timeout = -1;
        if (wait_head != NULL) {
            double left = due - monotonic();
            timeout = left <= 0 ? 0 : (int)ceil(left * 1000); /* ms, rounded up as Python's poll() */
        }
        int k = epoll_wait(ep, events, MAX_EVENTS, timeout);
        if (k < 0 && errno != EINTR) {
            perror("stamp relay: epoll_wait");
            return 1;
        }
        for (int i = 0; i < k; i++) {
            int fd = (int)events[i].data.u64;
            uint32_t ev = events[i].events;
            if (fd == ctrl) {
                if (!accept_conn()) return 0;
                continue;
            }
            if ((size_t)fd >= nslots || slots[fd].conn == NULL) continue; /* dropped by an earlier event of this round */
            struct conn *c = slots[fd].conn;
            if (slots[fd].is_tcp) {
                if (c->reading) read_tcp(c);
            } else if ((ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !collector_open(c)) {
                drop(c);
            } else if (ev & EPOLLOUT) {
                forward(c);
            }
        }
        if (wait_head != NULL && monotonic() >= due) {
            while (wait_head != NULL) forward(wait_head); /* forward() takes it off the list */
        }
    }
}
