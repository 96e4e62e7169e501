// The CPU assignment driver, compiled once per instruction set.
//
// Include inside `namespace fastssl::cpu::<isa>` after defining `struct Micro` with
//   MR, NR      rows and centroids of one register tile,
//   KC          depth steps (32-bit words) per pass in fp32 mode; KC x NR words stay in L1,
//   KC_BF16     the same in bf16 mode (a step there holds two products),
//   MC          rows per block (a multiple of MR): the packed x block stays in L2,
//   NCP         centroid panels per block: the partial tile buffer stays in L2,
//   tile<BF16>  the micro-kernel (see below).
//
// Loop nest (BLIS order, per block of MC rows owned by one thread):
//   for centroid block (NCP panels) / for depth chunk (KC) / for centroid panel / for row panel
// and, on the last depth chunk, the micro-kernel folds its scores into a running
// lane-wise (value, index) minimum per row, so the n x k matrix never exists and each
// tile's epilogue costs O(MR * NR) instead of a horizontal reduction.

struct PackedCentroids {
  AlignedVector<uint32_t> panels;  // [panel][steps][NR]
  std::vector<float> bias;       // [panel * NR]: ||c||^2 (l2) or 0 (ip); +inf for padding
  int64_t k = 0;
  int64_t panel_count = 0;
  int64_t steps = 0;
};

struct Workspace {
  AlignedVector<uint32_t> a;     // packed x block: [row panel][steps][MR]
  std::vector<double> x_sqnorm;  // [MC]
  AlignedVector<float> partial;  // [row panel][NCP][MR * NR]
  AlignedVector<float> best_value;  // [row panel][MR][NR], lane-wise running minimum
  AlignedVector<int32_t> best_index;
  std::vector<float> tmp;
  std::vector<uint32_t> words;
};

inline void pack_centroids(const MatrixView& c, int64_t c0, int64_t k, bool bf16,
                           Metric metric, PackedCentroids& out, bool parallel) {
  out.k = k;
  out.steps = depth_steps(c.cols, bf16);
  out.panel_count = (k + Micro::NR - 1) / Micro::NR;
  out.panels.resize(static_cast<size_t>(out.panel_count * out.steps * Micro::NR));
  out.bias.assign(static_cast<size_t>(out.panel_count * Micro::NR),
                  std::numeric_limits<float>::infinity());
  std::vector<double> sq(static_cast<size_t>(out.panel_count * Micro::NR), 0.0);
#pragma omp parallel if (parallel && out.panel_count > 1)
  {
    std::vector<float> tmp;
    std::vector<uint32_t> words;
#pragma omp for schedule(static)
    for (int64_t panel = 0; panel < out.panel_count; ++panel) {
      const int64_t first = panel * Micro::NR;
      const int64_t rows = std::min<int64_t>(Micro::NR, k - first);
      pack_panels(c, c0 + first, rows, Micro::NR, bf16,
                  out.panels.data() + panel * out.steps * Micro::NR, sq.data() + first, tmp,
                  words);
    }
  }
  for (int64_t j = 0; j < k; ++j)
    out.bias[j] = metric == Metric::L2 ? static_cast<float>(sq[j]) : 0.0f;
}

// Assigns rows [row0, row0 + rows) of x against `pc`; labels are label_base + local index.
template <bool BF16>
void run_rows(const MatrixView& x, int64_t row0, int64_t rows, const PackedCentroids& pc,
              int64_t label_base, Metric metric, AssignOutput out, Workspace& ws) {
  constexpr int MR = Micro::MR, NR = Micro::NR;
  constexpr int64_t KC = BF16 ? Micro::KC_BF16 : Micro::KC;
  const int64_t steps = pc.steps;
  const float alpha = metric == Metric::L2 ? 2.0f : 1.0f;
  for (int64_t block0 = 0; block0 < rows; block0 += Micro::MC) {
    const int64_t block_rows = std::min<int64_t>(Micro::MC, rows - block0);
    const int64_t row_panels = (block_rows + MR - 1) / MR;
    ws.a.resize(static_cast<size_t>(row_panels * steps * MR));
    ws.x_sqnorm.resize(static_cast<size_t>(block_rows));
    pack_panels(x, row0 + block0, block_rows, MR, BF16, ws.a.data(), ws.x_sqnorm.data(),
                ws.tmp, ws.words);
    ws.best_value.assign(static_cast<size_t>(row_panels * MR * NR),
                         std::numeric_limits<float>::infinity());
    ws.best_index.assign(static_cast<size_t>(row_panels * MR * NR), 0);
    if (steps > KC)
      ws.partial.resize(static_cast<size_t>(row_panels * Micro::NCP * MR * NR));

    for (int64_t jc = 0; jc < pc.panel_count; jc += Micro::NCP) {
      const int64_t block_panels = std::min<int64_t>(Micro::NCP, pc.panel_count - jc);
      for (int64_t p0 = 0; p0 < steps; p0 += KC) {
        const int64_t kc = std::min<int64_t>(KC, steps - p0);
        const bool first = p0 == 0, last = p0 + kc == steps;
        for (int64_t jp = 0; jp < block_panels; ++jp) {
          const int64_t panel = jc + jp;
          const uint32_t* b = pc.panels.data() + (panel * steps + p0) * NR;
          for (int64_t ip = 0; ip < row_panels; ++ip) {
            const uint32_t* a = ws.a.data() + (ip * steps + p0) * MR;
            float* partial = (first && last)
                                 ? nullptr
                                 : ws.partial.data() + (ip * Micro::NCP + jp) * MR * NR;
            Micro::template tile<BF16>(a, b, kc, partial, first, last,
                                       pc.bias.data() + panel * NR,
                                       static_cast<int32_t>(panel * NR), alpha,
                                       ws.best_value.data() + ip * MR * NR,
                                       ws.best_index.data() + ip * MR * NR);
          }
        }
      }
    }

    // Fold each row's NR lanes: smallest score, and the smallest index among equals so
    // that ties resolve to the first centroid as in the reference.
    for (int64_t r = 0; r < block_rows; ++r) {
      const float* values = ws.best_value.data() + r * NR;
      const int32_t* index = ws.best_index.data() + r * NR;
      float best = values[0];
      int32_t best_j = index[0];
      for (int lane = 1; lane < NR; ++lane) {
        if (values[lane] < best || (values[lane] == best && index[lane] < best_j)) {
          best = values[lane];
          best_j = index[lane];
        }
      }
      const int64_t row = row0 + block0 + r;
      out.labels[row] = label_base + best_j;
      const double xsq = ws.x_sqnorm[r];
      if (metric == Metric::L2) {
        out.distances[row] = static_cast<float>(std::max(0.0, xsq + static_cast<double>(best)));
      } else {
        out.distances[row] = -best;
      }
      if (out.x_sqnorm) out.x_sqnorm[row] = static_cast<float>(xsq);
    }
  }
}

inline bool compute_in_bf16(const MatrixView& x) { return x.dtype == DType::BF16; }

inline void assign(const MatrixView& x, const MatrixView& c, Metric metric,
                   AssignOutput out, int num_threads) {
  const bool bf16 = compute_in_bf16(x);
  PackedCentroids pc;
  pack_centroids(c, 0, c.rows, bf16, metric, pc, true);
  const int64_t blocks = (x.rows + Micro::MC - 1) / Micro::MC;
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads) if (blocks > 1)
  {
    Workspace ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t row0 = block * Micro::MC;
      const int64_t rows = std::min<int64_t>(Micro::MC, x.rows - row0);
      if (bf16)
        run_rows<true>(x, row0, rows, pc, 0, metric, out, ws);
      else
        run_rows<false>(x, row0, rows, pc, 0, metric, out, ws);
    }
  }
}

inline void assign_grouped(const MatrixView& x, const int64_t* x_offsets, const MatrixView& c,
                           const int64_t* c_offsets, int64_t groups, Metric metric,
                           AssignOutput out, int num_threads) {
  const bool bf16 = compute_in_bf16(x);
  // Work items: (group, first row, row count); large groups are cut so that threads
  // share them, small groups are one item each.
  constexpr int64_t kItemRows = 4 * Micro::MC;
  std::vector<int64_t> item_group, item_row;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r = x_offsets[g]; r < x_offsets[g + 1]; r += kItemRows) {
      item_group.push_back(g);
      item_row.push_back(r);
    }
  }
  const int64_t items = static_cast<int64_t>(item_group.size());
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads) if (items > 1)
  {
    Workspace ws;
    PackedCentroids pc;
    int64_t packed_group = -1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t g = item_group[item];
      if (g != packed_group) {
        pack_centroids(c, c_offsets[g], c_offsets[g + 1] - c_offsets[g], bf16, metric, pc,
                       false);
        packed_group = g;
      }
      const int64_t row0 = item_row[item];
      const int64_t rows = std::min(kItemRows, x_offsets[g + 1] - row0);
      if (bf16)
        run_rows<true>(x, row0, rows, pc, c_offsets[g], metric, out, ws);
      else
        run_rows<false>(x, row0, rows, pc, c_offsets[g], metric, out, ws);
    }
  }
}

// Entry points seen by the dispatcher in assign_cpu.cpp.
void assign_entry(const MatrixView& x, const MatrixView& c, Metric metric, AssignOutput out,
                  int threads) {
  assign(x, c, metric, out, threads);
}
void assign_grouped_entry(const MatrixView& x, const int64_t* x_offsets, const MatrixView& c,
                          const int64_t* c_offsets, int64_t groups, Metric metric,
                          AssignOutput out, int threads) {
  assign_grouped(x, x_offsets, c, c_offsets, groups, metric, out, threads);
}
