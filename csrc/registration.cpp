// Every schema of the hmoe op library lives here, grouped by op family. Kernels register
// implementations at the end of their own files (TORCH_LIBRARY_IMPL(hmoe, CPU|CUDA, m));
// fake kernels, autograd and the public Python functions live in hmoe/ops/<op>.py.
//
// Importing hmoe._C runs the static registrars below; the module itself only exposes
// build_info(), so no pybind11 is needed.

#include <Python.h>
#include <torch/library.h>

#ifndef HMOE_TORCH_VERSION
#define HMOE_TORCH_VERSION "unknown"
#endif
#ifndef HMOE_CUDA_VERSION
#define HMOE_CUDA_VERSION ""
#endif

TORCH_LIBRARY(hmoe, m) {
  // ---- Fused multi-embedding lookup (hmoe/ops/multi_embedding.py) -------------------------
  // weight (N, K, D); single-hot: indices (B, F) and segment_offsets None; jagged: indices
  // (nnz,) in field-major (f, b) order with segment_offsets (F * B + 1,). Output (K, B, F, D).
  m.def(
      "multi_embedding(Tensor weight, Tensor indices, Tensor? segment_offsets, "
      "Tensor table_offsets, int pooling) -> Tensor");
  // Dense gradient of weight, (N, K, D): the plain autograd path.
  m.def(
      "multi_embedding_backward(Tensor grad, Tensor indices, Tensor? segment_offsets, "
      "Tensor table_offsets, int pooling, SymInt num_rows) -> Tensor");
  // Row gradient without a dense (N, K, D) tensor: sorted unique rows (U,) and their summed
  // gradients (U, K, D). Backs sparse=True (a sparse COO gradient).
  m.def(
      "multi_embedding_backward_rows(Tensor grad, Tensor indices, Tensor? segment_offsets, "
      "Tensor table_offsets, int pooling) -> (Tensor, Tensor)");
  // Optimizer fused into backward: updates weight (and the row-wise state (N, K)) in place,
  // touching only the rows used. optimizer: 0 = SGD, 1 = row-wise Adagrad.
  m.def(
      "multi_embedding_backward_fused_(Tensor(a!) weight, Tensor(b!) state, Tensor grad, "
      "Tensor indices, Tensor? segment_offsets, Tensor table_offsets, int pooling, "
      "int optimizer, float lr, float eps) -> ()");

  // ---- MNSE digit-code embedding (hmoe/ops/mnse.py) ----------------------------------------
  // weight (F, R, K, E), R = sum_j bases[j] * num_digits[j]; codes (B, F), -1 = missing.
  // mode 0 (concat): (K, B, F, len(bases) * E); mode 1 (sum): (K, B, F, E).
  m.def("mnse(Tensor weight, Tensor codes, int[] bases, int[] num_digits, int mode) -> Tensor");
  // Gradient of weight, (F, R, K, E), summed in a fixed order (deterministic).
  m.def(
      "mnse_backward(Tensor grad, Tensor codes, int[] bases, int[] num_digits, int mode) "
      "-> Tensor");

  // ---- TIM target attention (hmoe/ops/tim_attention.py) ------------------------------------
  // rows (N, D), unit column stride, any row stride; ids (B, L) or None (then rows is the
  // pre-gathered (B * L, D)); target (B, D); position_embedding (P + 1, D); positions (B, L) and
  // ids of one int dtype; lengths (B,) int64. Returns out (B, D), alpha (B, H, L) and pooled
  // (B, D), alpha and pooled in float32 (float64 for float64 inputs). Steps i >= lengths[b] are
  // never read.
  m.def(
      "tim_attention(Tensor rows, Tensor? ids, Tensor target, Tensor position_embedding, "
      "Tensor positions, Tensor lengths, int num_heads) -> (Tensor, Tensor, Tensor)");
  // grad_out (B, D), grad_pooled (B, D) -> grad_rows (B, L, D) per step (zero at padding),
  // grad_target (B, D), grad_position_embedding (P + 1, D) (summed in a fixed order).
  m.def(
      "tim_attention_backward(Tensor grad_out, Tensor grad_pooled, Tensor rows, Tensor? ids, "
      "Tensor target, Tensor position_embedding, Tensor positions, Tensor lengths, "
      "Tensor alpha, Tensor pooled, int num_heads) -> (Tensor, Tensor, Tensor)");
  // Optimizer fused into backward (ids given): updates the item table rows read (and the
  // row-wise Adagrad state (N,)) in place; returns grad_target (B, D) and
  // grad_position_embedding (P + 1, D). optimizer: 0 = SGD, 1 = row-wise Adagrad.
  m.def(
      "tim_attention_backward_fused_(Tensor(a!) table, Tensor(b!) state, Tensor grad_out, "
      "Tensor grad_pooled, Tensor ids, Tensor target, Tensor position_embedding, "
      "Tensor positions, Tensor lengths, Tensor alpha, Tensor pooled, int num_heads, "
      "int optimizer, float lr, float eps) -> (Tensor, Tensor)");

  // ---- Id remap of dynamic vocabularies (hmoe/ops/id_remap.py) ------------------------------
  // Mutates the state (table (S, 2), nodes (C + P + 2, 4), meta (6,), int64) in place: counts
  // the batch's ids, admits those seen min_count times into rows 1..C, evicting the least
  // recently seen. ids: int64, any shape. Returns rows (shape of ids; 0 = not admitted) and the
  // rows assigned in this call (A,), in admission order. No gradient.
  m.def(
      "id_remap(Tensor(a!) table, Tensor(b!) nodes, Tensor(c!) meta, Tensor ids, int min_count) "
      "-> (Tensor, Tensor)");
}

static PyObject* hmoe_build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:s}", "torch_version", HMOE_TORCH_VERSION, "cuda_version",
                       HMOE_CUDA_VERSION);
}

static PyMethodDef hmoe_methods[] = {
    {"build_info", hmoe_build_info, METH_NOARGS,
     "The torch and CUDA versions this extension was compiled against."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef hmoe_module = {PyModuleDef_HEAD_INIT, "_C",
                                         "hmoe compiled kernels (registers torch.ops.hmoe)", -1,
                                         hmoe_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&hmoe_module); }
