// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `host_tensor<T, Rank>`: a small owning row-major array in host memory,
/// for examples, tests and users who want one. APIs never require it: they
/// take views, which `view()` hands out.

#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>

#include <array>
#include <cstddef>
#include <utility>
#include <vector>

namespace pqkv {

template <class T, std::size_t Rank>
class host_tensor {
 public:
  host_tensor() = default;

  /// Value-initialized (zeroed for arithmetic T) tensor of the given extents.
  template <class... Extents>
    requires(sizeof...(Extents) == Rank)
  explicit host_tensor(Extents... exts) : extents_{static_cast<index_t>(exts)...}
  {
    index_t n = 1;
    for (auto e : extents_) {
      PQKV_EXPECTS(e >= 0, "host_tensor", "extent=", e, " must be >= 0");
      n *= e;
    }
    data_.resize(static_cast<std::size_t>(n));
  }

  [[nodiscard]] pqkv::view<T, Rank> view() noexcept { return make(data_.data()); }
  [[nodiscard]] pqkv::view<T const, Rank> view() const noexcept { return make(data_.data()); }
  [[nodiscard]] pqkv::view<T const, Rank> const_view() const noexcept { return make(data_.data()); }

  [[nodiscard]] T* data() noexcept { return data_.data(); }
  [[nodiscard]] T const* data() const noexcept { return data_.data(); }
  [[nodiscard]] std::size_t size() const noexcept { return data_.size(); }
  [[nodiscard]] index_t extent(std::size_t r) const noexcept { return extents_[r]; }
  [[nodiscard]] std::vector<T>& storage() noexcept { return data_; }
  [[nodiscard]] std::vector<T> const& storage() const noexcept { return data_; }

 private:
  template <class P>
  [[nodiscard]] pqkv::view<P, Rank> make(P* p) const noexcept
  {
    return [&]<std::size_t... I>(std::index_sequence<I...>) {
      return pqkv::view<P, Rank>{p, extents_[I]...};
    }(std::make_index_sequence<Rank>{});
  }

  std::array<index_t, Rank> extents_{};
  std::vector<T> data_;
};

}  // namespace pqkv
