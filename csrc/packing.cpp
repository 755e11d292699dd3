// Packing of sample lengths into bins of a fixed capacity (mftcore._packing).
//
// best_fit_decreasing: items sorted by length, longest first (ties: lower index first); each goes to
// the open bin with the least room that still fits it (ties: the lowest bin index), else to a new
// bin. O(n log n) with an ordered set of (room, bin). mftcore/data/packing.py holds the Python
// reference with the same tie-breaking, and the tests compare the two exactly.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

py::array_t<int64_t> best_fit_decreasing(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths,
                                         int64_t capacity) {
  if (capacity < 1) throw std::invalid_argument("capacity must be >= 1");
  auto len = lengths.unchecked<1>();
  const int64_t n = len.shape(0);
  for (int64_t i = 0; i < n; ++i) {
    if (len(i) < 1 || len(i) > capacity)
      throw std::invalid_argument("length " + std::to_string(len(i)) + " at index " + std::to_string(i) +
                                  " is outside [1, capacity=" + std::to_string(capacity) + "]");
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len(a) > len(b); });

  py::array_t<int64_t> bins_out(n);
  auto bin_of = bins_out.mutable_unchecked<1>();
  std::set<std::pair<int64_t, int64_t>> open;  // (room left, bin index)
  int64_t num_bins = 0;
  {
    py::gil_scoped_release release;
    for (int64_t i : order) {
      const int64_t l = len(i);
      auto it = open.lower_bound({l, INT64_MIN});
      int64_t bin, room;
      if (it == open.end()) {
        bin = num_bins++;
        room = capacity;
      } else {
        bin = it->second;
        room = it->first;
        open.erase(it);
      }
      bin_of(i) = bin;
      if (room - l > 0) open.insert({room - l, bin});
    }
  }
  return bins_out;
}

PYBIND11_MODULE(_packing, m) {
  m.doc() = "mftcore packing of sample lengths into fixed-capacity rows";
  m.def("best_fit_decreasing", &best_fit_decreasing, py::arg("lengths"), py::arg("capacity"),
        "Bin index of each item under best-fit-decreasing packing into bins of `capacity`.");
}
