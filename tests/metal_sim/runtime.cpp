// Simulator runtime: runs a compiled kernel's threads as fibers, one threadgroup at a time.
// Threads of a threadgroup run until they block (SIMD collective, barrier) or return; then the
// scheduler resolves what can proceed. Buffers sit against PROT_NONE guard pages so out-of-bounds
// accesses fault; the fault is caught here and returned to Python instead of killing the process.
#if !defined(__x86_64__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700  // ucontext on macOS
#endif
#include <csetjmp>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "sim_abi.h"

namespace {

constexpr int kMaxThreads = 1024, kLanes = 32, kSlot = 64, kMaxBufs = 512, kMaxTg = 64;
constexpr size_t kStack = 256 * 1024, kGuard = 64 * 1024, kTgLimit = 32768;
enum State { READY, SIMD, BARRIER, DONE };

struct Fiber {
  void* sp;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  State state;
  int site, size;
  unsigned char slot[kSlot];
  ZsimIds ids;
};
struct Buf { char* base; size_t maplen; char* data; size_t n; int tag; };
struct TgVar { void* p; unsigned long n; };

Fiber g_fib[kMaxThreads];
char* g_stacks[kMaxThreads];  // each: guard page + kStack, kept for the life of the process
int g_n, g_cur;
void* g_sched_sp;
#if !defined(__x86_64__)
ucontext_t g_sched_uc;
#endif
unsigned char g_snap[kMaxThreads / kLanes][kLanes][kSlot];
unsigned g_snap_mask[kMaxThreads / kLanes];
void** g_args;
void (*g_entry)(void**, const ZsimIds*);
bool g_failed;
char g_err[2048];
Buf g_buf[kMaxBufs];
TgVar g_tg[kMaxTg];
int g_ntg;
unsigned long g_tg_bytes;
sigjmp_buf g_jmp;
void* volatile g_fault_addr;
volatile int g_fault_write;
char g_altstack[64 * 1024];

void fiber_main();

#if defined(__x86_64__)
// Saves callee-saved registers and the FP control words, swaps stacks.
extern "C" void zsim_ctx_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl zsim_ctx_switch
.type zsim_ctx_switch,@function
zsim_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size zsim_ctx_switch, .-zsim_ctx_switch
)");

void init_context(Fiber& f, char* stack) {
  unsigned long long* sp = (unsigned long long*)(stack + kGuard + kStack);
  unsigned long long ctl = 0;
  asm volatile("stmxcsr %0" : "=m"(*(unsigned*)&ctl));
  asm volatile("fnstcw %0" : "=m"(*((unsigned short*)&ctl + 2)));
  *--sp = 0;                                   // fiber_main's return address (it never returns)
  *--sp = (unsigned long long)&fiber_main;     // where the first switch "returns" to
  for (int i = 0; i < 6; i++) *--sp = 0;       // rbp rbx r12-r15
  *--sp = ctl;
  f.sp = sp;
}
void to_fiber(int i) { zsim_ctx_switch(&g_sched_sp, g_fib[i].sp); }
void to_scheduler() { zsim_ctx_switch(&g_fib[g_cur].sp, g_sched_sp); }
#else
void init_context(Fiber& f, char* stack) {
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = stack + kGuard;
  f.uc.uc_stack.ss_size = kStack;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_main, 0);
}
void to_fiber(int i) { swapcontext(&g_sched_uc, &g_fib[i].uc); }
void to_scheduler() { swapcontext(&g_fib[g_cur].uc, &g_sched_uc); }
#endif

void fiber_main() {
  g_entry(g_args, &g_fib[g_cur].ids);
  g_fib[g_cur].state = DONE;
  to_scheduler();
}

void fail(const char* msg) {
  if (!g_failed) snprintf(g_err, sizeof g_err, "%s", msg);
  g_failed = true;
}

void on_fault(int, siginfo_t* info, void* uctx) {
  g_fault_addr = info->si_addr;
#if defined(__x86_64__) && defined(REG_ERR)
  g_fault_write = (((ucontext_t*)uctx)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#else
  (void)uctx;
  g_fault_write = -1;
#endif
  siglongjmp(g_jmp, 1);
}

void set_ids(ZsimIds& d, const unsigned grid[3], const unsigned tg[3], const unsigned tgs[3],
             const unsigned gpos[3], const unsigned act[3], const unsigned lpos[3], unsigned n) {
  unsigned nominal = tg[0] * tg[1] * tg[2];
  for (int k = 0; k < 3; k++) {
    d.thread_position_in_threadgroup[k] = lpos[k];
    d.threadgroup_position_in_grid[k] = gpos[k];
    d.thread_position_in_grid[k] = gpos[k] * tg[k] + lpos[k];
    d.threadgroups_per_grid[k] = tgs[k];
    d.threads_per_grid[k] = grid[k];
    d.threads_per_threadgroup[k] = act[k];
    d.dispatch_threads_per_threadgroup[k] = tg[k];
    d.grid_origin[k] = 0;
    d.grid_size[k] = grid[k];
  }
  unsigned tid = lpos[0] + lpos[1] * act[0] + lpos[2] * act[0] * act[1];
  d.thread_index_in_threadgroup = tid;
  d.thread_index_in_simdgroup = tid % kLanes;
  d.simdgroup_index_in_threadgroup = tid / kLanes;
  d.simdgroups_per_threadgroup = (n + kLanes - 1) / kLanes;
  d.dispatch_simdgroups_per_threadgroup = (nominal + kLanes - 1) / kLanes;
  d.thread_execution_width = d.threads_per_simdgroup = kLanes;
  d.quadgroup_index_in_threadgroup = tid / 4;
  d.thread_index_in_quadgroup = tid % 4;
  d.quadgroups_per_threadgroup = (n + 3) / 4;
  d.dispatch_quadgroups_per_threadgroup = (nominal + 3) / 4;
}

// One lane group per SIMD-group: the lanes blocked at the earliest call site proceed together.
// Earliest (lowest __COUNTER__) approximates "innermost": lanes that left a loop or branch wait at
// a later site until the others reconverge there.
bool resolve_simd() {
  bool any = false;
  for (int s = 0; s * kLanes < g_n; s++) {
    int lo = s * kLanes, hi = lo + kLanes < g_n ? lo + kLanes : g_n, site = -1, size = 0;
    for (int i = lo; i < hi; i++)
      if (g_fib[i].state == SIMD && (site < 0 || g_fib[i].site < site)) site = g_fib[i].site, size = g_fib[i].size;
    if (site < 0) continue;
    unsigned mask = 0;
    memset(g_snap[s], 0xFF, sizeof g_snap[s]);
    for (int i = lo; i < hi; i++) {
      Fiber& f = g_fib[i];
      if (f.state != SIMD || f.site != site) continue;
      if (f.size != size) { fail("SIMD lanes met at one call site with values of different sizes"); return false; }
      memcpy(g_snap[s][i - lo], f.slot, size);
      mask |= 1u << (i - lo);
      f.state = READY;
    }
    g_snap_mask[s] = mask;
    any = true;
  }
  return any;
}

bool resolve_barrier() {
  int site = -1, waiting = 0, done = 0;
  for (int i = 0; i < g_n; i++) {
    Fiber& f = g_fib[i];
    if (f.state == DONE) { done++; continue; }
    if (f.state != BARRIER) continue;
    if (site >= 0 && f.site != site) {
      fail("threads of one threadgroup wait at different threadgroup_barrier calls (divergent barrier)");
      return false;
    }
    site = f.site;
    waiting++;
  }
  if (waiting == 0) return false;
  if (done) {
    snprintf(g_err, sizeof g_err, "threadgroup_barrier reached by %d of %d threads; %d returned before it "
             "(undefined behaviour in Metal)", waiting, g_n, done);
    g_failed = true;
    return false;
  }
  for (int i = 0; i < g_n; i++) g_fib[i].state = READY;
  return true;
}

unsigned long g_rng;
unsigned next_rand() {
  g_rng ^= g_rng << 13; g_rng ^= g_rng >> 7; g_rng ^= g_rng << 17;
  return (unsigned)(g_rng >> 11);
}

// Runs one threadgroup to completion; returns false on a kernel error.
bool run_threadgroup(int order) {
  int perm[kMaxThreads];
  for (;;) {
    for (int k = 0; k < g_n; k++) perm[k] = order == 1 ? g_n - 1 - k : k;
    if (order == 2)
      for (int k = g_n - 1; k > 0; k--) { int j = next_rand() % (k + 1), t = perm[k]; perm[k] = perm[j]; perm[j] = t; }
    for (int k = 0; k < g_n; k++) {
      int i = perm[k];
      if (g_fib[i].state != READY) continue;
      g_cur = i;
      to_fiber(i);
      if (g_failed) return false;
    }
    bool all_done = true;
    for (int i = 0; i < g_n; i++) all_done = all_done && g_fib[i].state == DONE;
    if (all_done) return true;
    if (resolve_simd()) continue;
    if (g_failed || !resolve_barrier()) {
      if (!g_failed) fail("simulator deadlock: no thread can proceed");
      return false;
    }
  }
}

const Buf* find_buf(const char* a) {
  for (int i = 0; i < kMaxBufs; i++)
    if (g_buf[i].base && a >= g_buf[i].base && a < g_buf[i].base + g_buf[i].maplen) return &g_buf[i];
  return nullptr;
}

}  // namespace

extern "C" {

unsigned zsim_lane(void) { return g_fib[g_cur].ids.thread_index_in_simdgroup; }

unsigned zsim_simd_sync(int site, const void* value, int n, void* all) {
  if (n > kSlot) { zsim_fail("SIMD collective on a value larger than 64 bytes"); return 0; }
  int me = g_cur;
  Fiber& f = g_fib[me];
  memcpy(f.slot, value, n);
  f.state = SIMD;
  f.site = site;
  f.size = n;
  to_scheduler();
  int s = g_fib[me].ids.simdgroup_index_in_threadgroup;
  for (int l = 0; l < kLanes; l++) memcpy((char*)all + l * n, g_snap[s][l], n);
  return g_snap_mask[s];
}

void zsim_barrier(int site) {
  g_fib[g_cur].state = BARRIER;
  g_fib[g_cur].site = site;
  to_scheduler();
}

void zsim_fail(const char* message) {
  fail(message);
  to_scheduler();
}

void zsim_tg_register(void* p, unsigned long n) {
  for (int i = 0; i < g_ntg; i++)
    if (g_tg[i].p == p) return;
  if (g_ntg == kMaxTg) { zsim_fail("too many threadgroup variables"); return; }
  g_tg[g_ntg++] = {p, n};
  g_tg_bytes += n;
  if (g_tg_bytes > kTgLimit) {
    snprintf(g_err, sizeof g_err, "threadgroup memory of %lu bytes exceeds Metal's 32 KB", g_tg_bytes);
    g_failed = true;
    to_scheduler();
    return;
  }
  memset(p, 0xFF, n);  // uninitialised threadgroup memory reads as NaN / -1
}

// A buffer whose last byte abuts a PROT_NONE region; the slack before it is filled with `fill` too.
void* zsim_alloc(size_t n, int fill, int tag) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE), body = ((n ? n : 1) + page - 1) / page * page;
  size_t maplen = kGuard + body + kGuard;
  int slot = -1;
  for (int i = 0; i < kMaxBufs && slot < 0; i++)
    if (!g_buf[i].base) slot = i;
  if (slot < 0) return nullptr;
  char* base = (char*)mmap(nullptr, maplen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return nullptr;
  mprotect(base + kGuard, body, PROT_READ | PROT_WRITE);
  memset(base + kGuard, fill, body);
  g_buf[slot] = {base, maplen, base + kGuard + body - n, n, tag};
  return g_buf[slot].data;
}

void zsim_free(void* data) {
  for (int i = 0; i < kMaxBufs; i++)
    if (g_buf[i].base && g_buf[i].data == data) {
      munmap(g_buf[i].base, g_buf[i].maplen);
      g_buf[i] = {};
    }
}

// Returns 0 on success, 1 on a kernel error (message in err), 2 on a memory fault:
// info = {buffer tag or -1 (-2: stack overflow), byte offset from the buffer start, is_write}.
int zsim_launch(void (*entry)(void**, const ZsimIds*), void** args, const unsigned grid[3],
                const unsigned tg[3], int order, unsigned seed, char* err, int errlen, long long* info) {
  unsigned n = tg[0] * tg[1] * tg[2], tgs[3];
  if (n == 0 || n > kMaxThreads) { snprintf(err, errlen, "threadgroup of %u threads (max %d)", n, kMaxThreads); return 1; }
  for (int k = 0; k < 3; k++) tgs[k] = (grid[k] + tg[k] - 1) / tg[k];
  for (unsigned i = 0; i < n; i++)
    if (!g_stacks[i]) {
      char* s = (char*)mmap(nullptr, kGuard + kStack, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (s == MAP_FAILED) { snprintf(err, errlen, "cannot map fiber stacks"); return 1; }
      mprotect(s + kGuard, kStack, PROT_READ | PROT_WRITE);
      g_stacks[i] = s;
    }
  g_entry = entry;
  g_args = args;
  g_failed = false;
  g_err[0] = 0;
  g_rng = 0x9E3779B97F4A7C15ull ^ seed;

  struct sigaction sa = {}, old_segv, old_bus;
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  stack_t alt = {}, old_alt;
  alt.ss_sp = g_altstack;
  alt.ss_size = sizeof g_altstack;
  sigaltstack(&alt, &old_alt);
  sigaction(SIGSEGV, &sa, &old_segv);
  sigaction(SIGBUS, &sa, &old_bus);

  int rc = 0;
  if (sigsetjmp(g_jmp, 1) == 0) {
    unsigned g[3];
    for (g[2] = 0; g[2] < tgs[2] && !rc; g[2]++)
      for (g[1] = 0; g[1] < tgs[1] && !rc; g[1]++)
        for (g[0] = 0; g[0] < tgs[0] && !rc; g[0]++) {
          unsigned act[3], l[3];
          for (int k = 0; k < 3; k++) act[k] = grid[k] - g[k] * tg[k] < tg[k] ? grid[k] - g[k] * tg[k] : tg[k];
          g_n = (int)(act[0] * act[1] * act[2]);
          for (l[2] = 0; l[2] < act[2]; l[2]++)
            for (l[1] = 0; l[1] < act[1]; l[1]++)
              for (l[0] = 0; l[0] < act[0]; l[0]++) {
                int i = (int)(l[0] + l[1] * act[0] + l[2] * act[0] * act[1]);
                set_ids(g_fib[i].ids, grid, tg, tgs, g, act, l, (unsigned)g_n);
                g_fib[i].state = READY;
                init_context(g_fib[i], g_stacks[i]);
              }
          g_ntg = 0;
          g_tg_bytes = 0;
          if (!run_threadgroup(order)) rc = 1;
        }
    if (rc) snprintf(err, errlen, "%s", g_err);
  } else {
    const char* a = (const char*)g_fault_addr;
    const Buf* b = find_buf(a);
    info[0] = b ? b->tag : -1;
    info[1] = b ? (long long)(a - b->data) : (long long)(size_t)a;
    info[2] = g_fault_write;
    for (int i = 0; i < kMaxThreads && !b; i++)
      if (g_stacks[i] && a >= g_stacks[i] && a < g_stacks[i] + kGuard) info[0] = -2;
    rc = 2;
  }
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  sigaltstack(&old_alt, nullptr);
  return rc;
}

}  // extern "C"
