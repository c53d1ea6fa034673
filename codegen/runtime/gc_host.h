// gc_host.h: compile generated CUDA C kernels, unchanged, with g++ and run them on the CPU.
//
// Execution model. The blocks of a grid are spread over CPU cores by OpenMP (one block at a time per
// OS thread). Inside a block, a kernel without __syncthreads() runs as a plain loop over its threads.
// A kernel with barriers runs every CUDA thread as a ucontext fibre: __syncthreads() switches to the
// next unfinished fibre of the block, round robin, so each fibre resumes only after all the others
// reached the barrier (or returned). Fibres never pre-empt each other: warp-synchronous code (shuffles,
// spinning on a neighbour without a barrier) has no counterpart here and is not emulated.
// __shared__ is `static thread_local`: shared by the fibres of a block, private to each OS thread
// (under GC_HOST_ASAN a plain static, the blocks on one OS thread: see "Bounds" in codegen/host.py).
//
// Races. Running a block's threads one after another hides a missing barrier whenever the writer
// happens to run before the reader, and a cp.async copy may land anywhere between its issue and the
// wait that covers it. GC_HOST_SCHEDULE (read at each launch) picks the schedule: "forward" (the
// default) runs blocks, fibres and plain loops in index order and lands each cp.async copy as late as
// the hardware may (at the issuing thread's wait_group that covers it: a read that does not wait sees
// the buffer's old contents); "reverse" runs them in the opposite order; "early" lands each copy when
// it is issued (a copy into a buffer other threads are still reading overwrites it); "reverse,early"
// both. A kernel whose results are the same under all four has no race between two of its threads
// that one of the orders would expose (every pair of threads meets in both orders).
#pragma once
#define GC_HOST 1
#undef _FORTIFY_SOURCE  // its longjmp check aborts on jumps between fibre stacks

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <csetjmp>
#include <cstring>
#include <type_traits>
#include <vector>
#include <sys/mman.h>
#include <ucontext.h>

// ---- CUDA keywords (defined after the system headers: glibc spells attributes `__noinline__` too) ----
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#ifdef GC_HOST_ASAN
#define __shared__ static  // one OS thread runs every block (launch): plain statics get AddressSanitizer's redzones
#else
#define __shared__ static thread_local
#endif
// __restrict__ is a g++ keyword already.

// ---- built-in variables and vector types ----
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// Per OS thread: blocks on other cores have their own; the fibre switch rewrites threadIdx.
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
constexpr int warpSize = 32;

#define GC_VEC2(T, N) struct __align__(2 * sizeof(T)) N##2 { T x, y; }; \
    inline N##2 make_##N##2(T x, T y) { return {x, y}; }
#define GC_VEC4(T, N) struct __align__(4 * sizeof(T)) N##4 { T x, y, z, w; }; \
    inline N##4 make_##N##4(T x, T y, T z, T w) { return {x, y, z, w}; }
GC_VEC2(float, float) GC_VEC4(float, float) GC_VEC2(int, int) GC_VEC4(int, int) GC_VEC2(double, double)

// ---- math ----
// glibc declares __expf, __logf, __powf, ... as its own internal functions: macros take precedence.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __powf(x, y) powf(x, y)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __log2f(x) log2f(x)
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }  // _rn: -ffp-contract=off keeps them unfused
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0

// CUDA's global min/max: arithmetic operands, result in their common type (int,unsigned -> unsigned);
// floating point follows fminf/fmaxf (a NaN operand loses). g++ accepts a superset of NVRTC here.
template <class A, class B, class T = std::common_type_t<A, B>>
inline std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, T> min(A a, B b) {
    if constexpr (std::is_floating_point_v<T>) return std::fmin(T(a), T(b));
    else return T(a) < T(b) ? T(a) : T(b);
}
template <class A, class B, class T = std::common_type_t<A, B>>
inline std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, T> max(A a, B b) {
    if constexpr (std::is_floating_point_v<T>) return std::fmax(T(a), T(b));
    else return T(a) < T(b) ? T(b) : T(a);
}

template <class To, class From> inline To gc_bits(From v) { To t; std::memcpy(&t, &v, sizeof t); return t; }
inline int __float_as_int(float x) { return gc_bits<int>(x); }
inline unsigned __float_as_uint(float x) { return gc_bits<unsigned>(x); }
inline float __int_as_float(int x) { return gc_bits<float>(x); }
inline float __uint_as_float(unsigned x) { return gc_bits<float>(x); }
inline long long __double_as_longlong(double x) { return gc_bits<long long>(x); }
inline double __longlong_as_double(long long x) { return gc_bits<double>(x); }

template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }  // past L1 on the GPU; one memory here
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- atomics: blocks run in parallel on several cores, so these are real atomics ----
// The value parameter is not deduced (gc_id), so atomicAdd(unsigned_ptr, 1) converts 1 as CUDA does.
template <class T> struct gc_id { using type = T; };
template <class T> using gc_val = typename gc_id<T>::type;
template <class T, class F> inline T gc_atomic_update(T* p, F f) {  // CAS loop: returns the old value
    T old, next;
    __atomic_load(p, &old, __ATOMIC_SEQ_CST);
    do next = f(old);
    while (!__atomic_compare_exchange(p, &old, &next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
}
template <class T> inline T atomicAdd(T* p, gc_val<T> v) {
    if constexpr (std::is_integral_v<T>) return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    else return gc_atomic_update(p, [v](T o) { return o + v; });
}
template <class T> inline T atomicSub(T* p, gc_val<T> v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T atomicAnd(T* p, gc_val<T> v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T atomicOr(T* p, gc_val<T> v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T atomicXor(T* p, gc_val<T> v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T atomicMax(T* p, gc_val<T> v) { return gc_atomic_update(p, [v](T o) { return o < v ? v : o; }); }
template <class T> inline T atomicMin(T* p, gc_val<T> v) { return gc_atomic_update(p, [v](T o) { return v < o ? v : o; }); }
template <class T> inline T atomicExch(T* p, gc_val<T> v) {
    T old;
    __atomic_exchange(p, &v, &old, __ATOMIC_SEQ_CST);
    return old;
}
template <class T> inline T atomicCAS(T* p, gc_val<T> compare, gc_val<T> v) {
    __atomic_compare_exchange(p, &compare, &v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;  // the old value, whether or not the swap happened
}
inline unsigned atomicInc(unsigned* p, unsigned v) { return gc_atomic_update(p, [v](unsigned o) { return o >= v ? 0u : o + 1; }); }

// ---- the block scheduler ----
namespace gc_host {
#ifndef GC_HOST_STACK
#define GC_HOST_STACK (64 * 1024)  // per fibre: kernels keep small frames (a few register-tile arrays)
#endif
constexpr size_t kStack = GC_HOST_STACK;

// A cp.async copy issued and not yet landed: `group` is the commit group it belongs to (the fibre's
// count of commits when it was issued); zero-filled where `ok` is false.
struct Copy { void* dst; const void* src; int bytes; bool ok; int group; };
struct Fiber {
    jmp_buf jb; uint3 tid; bool done;
    std::vector<Copy> copies;  // in issue order
    int commits = 0;
};

// The fibres of the block this OS thread is running. A fibre is created once (makecontext) and then
// parks between blocks at the top of fiber_main, so a block starts without creating anything. Switches
// use _setjmp/_longjmp: swapcontext would also save and restore the signal mask, a system call per
// switch that made barriers several times slower. Stacks are mapped once per OS thread; after each
// launch their pages are handed back lazily (MADV_FREE), so hundreds of loaded kernels do not each
// pin threads x fibres x pages of stack; the fibres are then created again by the next launch.
struct Pool {
    Fiber* fibers = nullptr;
    char* stacks = nullptr;
    int cap = 0, ready = 0;         // fibres mapped, fibres created and parked
    int n = 0, cur = 0, live = 0;   // the running block: its fibres, the current one, the unfinished
    bool active = false;            // inside a fibre block: __syncthreads() may switch
    bool reverse = false;           // GC_HOST_SCHEDULE=reverse: the fibres run n-1, n-2, ..., 0
    bool early = false;             // GC_HOST_SCHEDULE=early: cp.async copies land when issued
    jmp_buf home;                   // the OS thread's own stack, resumed when the block is done
    void (*body)(void*) = nullptr;  // the kernel call for the current thread, and its closure
    void* arg = nullptr;

    void reserve(int want);
    void release() {
#ifdef MADV_FREE
        if (stacks) madvise(stacks, size_t(cap) * kStack, MADV_FREE);
#endif
        ready = 0;  // the parked fibres' frames may be gone
    }
    ~Pool() { if (stacks) munmap(stacks, size_t(cap) * kStack); delete[] fibers; }
};
inline thread_local Pool pool;

// Land (perform, in issue order) the fibre's copies of the groups before `group`, and forget them.
inline void land_copies(Fiber& f, int group) {
    size_t kept = 0;
    for (size_t i = 0; i < f.copies.size(); ++i) {
        const Copy& c = f.copies[i];
        if (c.group < group) {
            if (c.ok) std::memcpy(c.dst, c.src, size_t(c.bytes));
            else std::memset(c.dst, 0, size_t(c.bytes));
        } else {
            f.copies[kept++] = c;
        }
    }
    f.copies.resize(kept);
}

// Switch from the current fibre to the next unfinished one (round robin). `save` is false when the
// current fibre has just parked itself.
inline void switch_to_next(bool save) {
    Pool& p = pool;
    int from = p.cur, to = from;
    if (p.reverse) {
        do to = (to == 0) ? p.n - 1 : to - 1;
        while (p.fibers[to].done && to != from);
    } else {
        do to = (to + 1 == p.n) ? 0 : to + 1;
        while (p.fibers[to].done && to != from);
    }
    if (to == from) return;  // the only live fibre: nothing to wait for
    p.cur = to;
    threadIdx = p.fibers[to].tid;
    if (!save || !_setjmp(p.fibers[from].jb)) _longjmp(p.fibers[to].jb, 1);
}

[[noreturn]] inline void fiber_main() {
    Pool& p = pool;
    Fiber& me = p.fibers[p.cur];
    for (;;) {
        if (!_setjmp(me.jb)) {  // park: a block starts this thread by jumping here
            if (p.live > 0) switch_to_next(false);
            _longjmp(p.home, 1);  // the block's last fibre, or the fibre's creation
        }
        p.body(p.arg);
        land_copies(me, me.commits + 1);  // copies never waited for land when the thread ends
        me.done = true;
        --p.live;
    }
}

inline void Pool::reserve(int want) {
    if (want > cap) {
        if (stacks) munmap(stacks, size_t(cap) * kStack);
        delete[] fibers;
        fibers = new Fiber[want];
        void* m = mmap(nullptr, size_t(want) * kStack, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) { std::fprintf(stderr, "gc_host: cannot map fibre stacks\n"); std::abort(); }
        stacks = static_cast<char*>(m);
        cap = want;
        ready = 0;
    }
    live = 0;
    for (; ready < want; ++ready) {  // run each new fibre up to its parking place
        ucontext_t uc;
        getcontext(&uc);
        uc.uc_stack.ss_sp = stacks + size_t(ready) * kStack;
        uc.uc_stack.ss_size = kStack;
        uc.uc_link = nullptr;  // fiber_main never returns
        makecontext(&uc, fiber_main, 0);
        cur = ready;
        if (!_setjmp(home)) setcontext(&uc);
    }
}

inline void run_block_fibers(dim3 b) {
    Pool& p = pool;
    int n = int(b.x * b.y * b.z);
    p.reserve(n);
    for (int i = 0; i < n; ++i) {
        p.fibers[i].tid = {i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
        p.fibers[i].done = false;
        p.fibers[i].copies.clear();
        p.fibers[i].commits = 0;
    }
    p.n = p.live = n;
    p.cur = p.reverse ? n - 1 : 0;
    threadIdx = p.fibers[p.cur].tid;
    p.active = true;
    if (!_setjmp(p.home)) _longjmp(p.fibers[p.cur].jb, 1);
    p.active = false;
}

template <class F> void run_block_plain(dim3 b, bool reverse, F& kernel_call) {  // a template: the kernel inlines here
    const long long n = (long long)b.x * b.y * b.z;
    for (long long j = 0; j < n; ++j) {
        const long long i = reverse ? n - 1 - j : j;
        threadIdx = {unsigned(i % b.x), unsigned(i / b.x % b.y), unsigned(i / ((long long)b.x * b.y))};
        kernel_call();
    }
}

// Run `kernel_call()` for every thread of every block. `barrier`: the kernel calls __syncthreads().
template <class F> void launch(dim3 grid, dim3 block, bool barrier, F& kernel_call) {
    long long nblocks = (long long)grid.x * grid.y * grid.z;
    if (nblocks == 0 || block.x * block.y * block.z == 0) return;
    const char* schedule = std::getenv("GC_HOST_SCHEDULE");  // checked by the Python side (codegen.host)
    const bool reverse = schedule && std::strstr(schedule, "reverse"), early = schedule && std::strstr(schedule, "early");
#ifdef GC_HOST_ASAN
    #pragma omp parallel num_threads(1)
#else
    #pragma omp parallel
#endif
    {
        Pool& p = pool;
        p.reverse = reverse;
        p.early = early;
        p.body = [](void* f) { (*static_cast<F*>(f))(); };
        p.arg = &kernel_call;
        gridDim = grid;
        blockDim = block;
        #pragma omp for schedule(dynamic)
        for (long long j = 0; j < nblocks; ++j) {
            const long long i = reverse ? nblocks - 1 - j : j;
            blockIdx = {unsigned(i % grid.x), unsigned(i / grid.x % grid.y), unsigned(i / ((long long)grid.x * grid.y))};
            if (barrier) run_block_fibers(block);
            else run_block_plain(block, reverse, kernel_call);
        }
        if (barrier) p.release();
    }
}
}  // namespace gc_host

inline void __syncthreads() {
    if (!gc_host::pool.active) {  // launched as barrier-free: a barrier would silently be wrong
        if (blockDim.x * blockDim.y * blockDim.z == 1) return;
        std::fprintf(stderr, "gc_host: __syncthreads() in a kernel launched without barrier=True\n");
        std::abort();
    }
    asm volatile("" ::: "memory");  // shared memory must be re-read after the other fibres ran
    gc_host::switch_to_next(true);
    asm volatile("" ::: "memory");
}

// ---- cp.async: the copy lands at the issuing thread's wait for its group (see "Races" above) ----
namespace gc_host {
inline void async_copy(void* dst, const void* src, int bytes, bool ok) {
    Pool& p = pool;
    if (!p.active || p.early) {  // "early", or a barrier-free launch (a thread reading back its own copies)
        if (ok) std::memcpy(dst, src, size_t(bytes));
        else std::memset(dst, 0, size_t(bytes));
        return;
    }
    Fiber& f = p.fibers[p.cur];
    f.copies.push_back({dst, src, bytes, ok, f.commits});
}
inline void async_commit() {
    if (pool.active) ++pool.fibers[pool.cur].commits;
}
inline void async_wait(int newest_pending) {  // cp.async.wait_group N: all but the N newest committed groups
    asm volatile("" ::: "memory");
    if (pool.active) {
        Fiber& f = pool.fibers[pool.cur];
        land_copies(f, f.commits - newest_pending);
    }
    asm volatile("" ::: "memory");
}
}  // namespace gc_host
