// SPDX-License-Identifier: Apache-2.0
// A project that uses an installed pqkv through find_package(pqkv CONFIG).
#include <pqkv/pqkv.hpp>

#include <cstdio>

int main()
{
  pqkv::pq_config cfg{.dim = 128, .m = 16, .nbits = 8};
  cfg.validate();
  pqkv::codebook book{cfg, 8};
  std::printf("pqkv consumer: %lld heads x %lld subspaces x %lld centroids\n",
              static_cast<long long>(book.heads()), static_cast<long long>(cfg.m),
              static_cast<long long>(cfg.ksub()));
  return book.centroids().extent(3) == 8 ? 0 : 1;
}
