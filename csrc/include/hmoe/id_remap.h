// The id remap of dynamic vocabularies (semantics, state layout and shapes: hmoe/ops/id_remap.py).
// This header holds the one implementation of the state machine: the hash table, the LRU lists
// and the admission rule. id_remap_cpu.cpp runs it on the host; id_remap_cuda.cu runs the same
// functions in one device thread (HMOE_HD = __host__ __device__ under nvcc), so the CUDA kernel
// cannot drift from the CPU kernel that the tests compare with the Python reference.
//
// State (all int64, contiguous; C = capacity, P = pending capacity):
//   table (S, 2)      open addressing, linear probing, S a power of two >= 2 (C + P) (load <= 1/2):
//                     [key, node] per slot, key kEmpty (INT64_MIN) = free. Deletion shifts the
//                     following entries back (no tombstones, so one reserved id suffices).
//   nodes (C+P+2, 4)  [id, value, prev, next] per node (32 bytes: a node's fields share a cache
//                     line). Node 0 is the sentinel of the admitted LRU list, nodes 1..C are the
//                     embedding rows (node = row), nodes C+1..C+P hold pending ids, node C+P+1 is
//                     the sentinel of the pending LRU list. value: a pending node's count; an
//                     admitted node's clock of the last call that saw it. Lists are circular
//                     through their sentinel: next[sentinel] = least recent, prev[sentinel] = most
//                     recent. Free pending nodes form a stack chained through next.
//   meta (6,)         clock, rows used (= admitted ids: rows are only ever reclaimed, never
//                     freed), pending size, top of the free pending-node stack (-1: none), C, P.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#ifdef __CUDACC__
#define HMOE_HD __host__ __device__
#else
#define HMOE_HD
#endif

namespace hmoe {
namespace id_remap {

constexpr int64_t kEmpty = INT64_MIN;  // the reserved id: marks a free table slot
enum NodeField : int64_t { kId = 0, kValue = 1, kPrev = 2, kNext = 3, kNodeFields = 4 };
enum MetaField : int64_t {
  kClock = 0,
  kRowsUsed = 1,
  kPendingSize = 2,
  kFreeTop = 3,
  kCapacity = 4,
  kPendingCapacity = 5,
  kMetaFields = 6
};

// splitmix64's finaliser, as hmoe.data.hashing.mix64.
HMOE_HD inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

struct State {
  int64_t* table;
  int64_t mask;  // S - 1
  int64_t* nodes;
  int64_t* meta;
  int64_t capacity;
  int64_t pending_capacity;

  HMOE_HD int64_t& key(int64_t slot) const { return table[2 * slot]; }
  HMOE_HD int64_t& slot_node(int64_t slot) const { return table[2 * slot + 1]; }
  HMOE_HD int64_t& node(int64_t n, NodeField f) const { return nodes[kNodeFields * n + f]; }
  HMOE_HD int64_t admitted_list() const { return 0; }
  HMOE_HD int64_t pending_list() const { return capacity + pending_capacity + 1; }
  HMOE_HD bool is_row(int64_t n) const { return n >= 1 && n <= capacity; }
  HMOE_HD int64_t home(int64_t id) const { return int64_t(mix64(uint64_t(id)) & uint64_t(mask)); }

  // ---- hash table --------------------------------------------------------------------------

  // The slot holding id, or -1. The table always has a free slot (S > C + P), so the probe ends.
  HMOE_HD int64_t find_slot(int64_t id) const {
    for (int64_t slot = home(id);; slot = (slot + 1) & mask) {
      const int64_t k = key(slot);
      if (k == id) return slot;
      if (k == kEmpty) return -1;
    }
  }

  // The node of id, or -1 when the id is neither admitted nor pending.
  HMOE_HD int64_t find_node(int64_t id) const {
    const int64_t slot = find_slot(id);
    return slot < 0 ? -1 : slot_node(slot);
  }

  HMOE_HD void insert(int64_t id, int64_t n) const {  // id must be absent
    int64_t slot = home(id);
    while (key(slot) != kEmpty) slot = (slot + 1) & mask;
    key(slot) = id;
    slot_node(slot) = n;
  }

  // Backward-shift deletion: every entry after the hole that may move into it (its home slot is
  // not cyclically in (hole, j]) moves back, so probes never need tombstones.
  HMOE_HD void erase(int64_t id) const {
    int64_t hole = find_slot(id);
    for (int64_t j = (hole + 1) & mask; key(j) != kEmpty; j = (j + 1) & mask) {
      const int64_t h = home(key(j));
      const bool stays = hole <= j ? (hole < h && h <= j) : (hole < h || h <= j);
      if (!stays) {
        key(hole) = key(j);
        slot_node(hole) = slot_node(j);
        hole = j;
      }
    }
    key(hole) = kEmpty;
    slot_node(hole) = -1;
  }

  // ---- intrusive LRU lists -----------------------------------------------------------------

  HMOE_HD void unlink(int64_t n) const {
    const int64_t p = node(n, kPrev), q = node(n, kNext);
    node(p, kNext) = q;
    node(q, kPrev) = p;
  }

  HMOE_HD void push_back(int64_t list, int64_t n) const {  // most recent end
    const int64_t last = node(list, kPrev);
    node(last, kNext) = n;
    node(n, kPrev) = last;
    node(n, kNext) = list;
    node(list, kPrev) = n;
  }

  HMOE_HD void move_to_back(int64_t list, int64_t n) const {
    if (node(list, kPrev) == n) return;
    unlink(n);
    push_back(list, n);
  }

  // ---- pending nodes -------------------------------------------------------------------------

  HMOE_HD void free_pending(int64_t n) const {
    unlink(n);
    node(n, kId) = kEmpty;
    node(n, kValue) = 0;
    node(n, kPrev) = -1;
    node(n, kNext) = meta[kFreeTop];
    meta[kFreeTop] = n;
    --meta[kPendingSize];
  }

  // A new pending entry (id, count) at the most recent end; the least recent pending entry is
  // dropped first when the table is full.
  HMOE_HD int64_t new_pending(int64_t id, int64_t count) const {
    if (meta[kPendingSize] == pending_capacity) {
      const int64_t oldest = node(pending_list(), kNext);
      erase(node(oldest, kId));
      free_pending(oldest);
    }
    const int64_t n = meta[kFreeTop];
    meta[kFreeTop] = node(n, kNext);
    ++meta[kPendingSize];
    node(n, kId) = id;
    node(n, kValue) = count;
    push_back(pending_list(), n);
    insert(id, n);
    return n;
  }

  // ---- one call ------------------------------------------------------------------------------

  // Step 3 for one not-admitted id u seen c times: count it, and admit it once its count reaches
  // min_count. Returns its row, or 0 while it stays pending; appends a new row to assigned.
  HMOE_HD int64_t count_and_admit(int64_t u, int64_t c, int64_t min_count, int64_t clock,
                                  int64_t* assigned, int64_t* num_assigned) const {
    int64_t n = find_node(u);
    if (n < 0) {
      n = new_pending(u, c);
    } else {
      node(n, kValue) += c;
      move_to_back(pending_list(), n);
    }
    if (node(n, kValue) < min_count) return 0;
    int64_t row;
    if (meta[kRowsUsed] < capacity) {
      row = ++meta[kRowsUsed];  // the smallest never-used row
    } else {
      row = node(admitted_list(), kNext);  // the least recently seen admitted id
      if (node(row, kValue) == clock) return 0;  // seen in this call: every row is in use
      erase(node(row, kId));  // forgotten entirely
      unlink(row);
    }
    free_pending(n);
    node(row, kId) = u;
    node(row, kValue) = clock;
    push_back(admitted_list(), row);
    slot_node(find_slot(u)) = row;  // (found anew: the erase above may have moved u's slot)
    assigned[(*num_assigned)++] = row;
    return row;
  }

  // Steps 1-3 over the U distinct ids of a batch, in order of first occurrence, with counts[k]
  // occurrences each. rows[k] holds on entry the node find_node(uniq[k]) gave before the call
  // (-1: absent) and on exit the row of uniq[k] after the call (0: still pending). The rows given
  // in this call go to assigned[0 .. *num_assigned) (assigned has room for U).
  HMOE_HD void remap_unique(const int64_t* uniq, const int64_t* counts, int64_t* rows, int64_t U,
                            int64_t min_count, int64_t* assigned, int64_t* num_assigned) const {
    const int64_t clock = ++meta[kClock];
    for (int64_t k = 0; k < U; ++k) {  // step 2: touch the admitted ids
      if (is_row(rows[k])) {
        move_to_back(admitted_list(), rows[k]);
        node(rows[k], kValue) = clock;
      } else {
        rows[k] = -1;
      }
    }
    *num_assigned = 0;
    for (int64_t k = 0; k < U; ++k) {  // step 3: count, admit, evict
      if (rows[k] == -1) {
        rows[k] = count_and_admit(uniq[k], counts[k], min_count, clock, assigned, num_assigned);
      }
    }
  }
};

// Checks that hold for every backend (id_remap_checks.cpp): dtypes, shapes and devices of the
// state and ids, the state's C and P (read from meta: a device-to-host copy for CUDA tensors)
// against its shapes, min_count >= 1. Returns the state over the tensors' data.
State check_args(const at::Tensor& table, const at::Tensor& nodes, const at::Tensor& meta,
                 const at::Tensor& ids, int64_t min_count);

}  // namespace id_remap
}  // namespace hmoe
