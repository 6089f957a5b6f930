// What an atomic increment costs when both cores write the same cache line, against a line
// each (docs/benchmarks.md, "The JSON split, lines every worker writes, long prompts").
// Two threads, pinned to CPUs 0 and 1, each increment a counter 20 M times with GAP iterations of other
// work between increments (GAP 2000: about 600 ns here, a request's spacing on one worker).
//
//   gcc -O2 -pthread -DGAP=2000 -o /tmp/pingpong tools/bench/pingpong.c && /tmp/pingpong
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

#ifndef GAP
#define GAP 2000
#endif
#define OPS 20000000L

_Alignas(128) static atomic_long shared_line;
_Alignas(128) static atomic_long own_line[2][16]; // 128 bytes apart: a line each
static int shared;

static void *run(void *arg) {
    long cpu = (long)arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
    atomic_long *c = shared ? &shared_line : &own_line[cpu][0];
    for (long i = 0; i < OPS; i++) {
        atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
        for (volatile int k = 0; k < GAP; k++) {
        }
    }
    return 0;
}

int main(void) {
    for (shared = 0; shared < 2; shared++) {
        struct timespec t0, t1;
        pthread_t a, b;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        pthread_create(&a, 0, run, (void *)0);
        pthread_create(&b, 0, run, (void *)1);
        pthread_join(a, 0);
        pthread_join(b, 0);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
        printf("%s line: %.1f ns per increment and gap\n", shared ? "shared" : "own", ns / OPS);
    }
    return 0;
}
