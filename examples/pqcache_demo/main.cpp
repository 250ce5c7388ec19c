// SPDX-License-Identifier: Apache-2.0
// Placeholder until the demo lands: prints the build's configuration.
#include <pqkv/pqkv.hpp>
#include <cstdio>
int main() { std::puts("pqcache_demo: not yet written"); return 0; }
