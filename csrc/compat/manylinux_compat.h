// Force-included (-include) into every C++ file of _C when building on x86-64 glibc: keeps the
// module within manylinux_2_28 (glibc 2.28, GLIBCXX_3.4.24, CXXABI_1.3.11) when the build
// machine has a newer glibc and GCC (Debian 12: glibc 2.36, GCC 12). See packaging/README.md.
//
// 1. glibc 2.34 moved libpthread and libdl into libc: a plain link binds pthread_once, dlopen,
//    ... to their new GLIBC_2.34 versions. libc still exports the old GLIBC_2.2.5 versions
//    (the same functions), and on glibc < 2.34 those live in libpthread.so.0/libdl.so.2, which
//    the module names as NEEDED (CMakeLists.txt). Only the symbols _C uses are listed; the
//    packaging test fails on any other.
// 2. GCC >= 11 headers read glibc 2.32's __libc_single_threaded to skip atomic reference
//    counting; it is renamed to a hidden variable of _C that is always 0 ("threads may exist":
//    reference counts stay atomic, which is what a glibc without the variable gets).
// 3. The libstdc++ functions newer than GLIBCXX_3.4.24/CXXABI_1.3.11 that GCC 12's inline code
//    calls are defined locally in manylinux_compat.cpp (as gcc-toolset's libstdc++_nonshared.a
//    does for manylinux_2_28's own compiler); exports.map keeps them out of the dynamic table.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && !defined(__CUDACC__)
#include <features.h>  // defines __GLIBC__ on glibc
#endif

#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && !defined(__CUDACC__)
#define KFAC_FAST_MANYLINUX_COMPAT 1
__asm__(".symver pthread_once,pthread_once@GLIBC_2.2.5");
__asm__(".symver dlopen,dlopen@GLIBC_2.2.5");
__asm__(".symver dlsym,dlsym@GLIBC_2.2.5");
__asm__(".symver dlerror,dlerror@GLIBC_2.2.5");
__asm__(".symver dlclose,dlclose@GLIBC_2.2.5");

#define __libc_single_threaded kfac_fast_libc_single_threaded
#endif
