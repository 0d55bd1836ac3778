// Local definitions that keep _C within manylinux_2_28 (see manylinux_compat.h, which every C++
// file of _C includes first). exports.map makes all of them local to _C, so neither libstdc++
// nor another module ever binds to them, and _C's own calls never leave the module.
#ifdef KFAC_FAST_MANYLINUX_COMPAT
#include <cxxabi.h>

#include <cstring>
#include <exception>
#include <new>

#if __has_include(<sys/single_threaded.h>)
#include <sys/single_threaded.h>
// Renamed by manylinux_compat.h; 0 = "other threads may exist", so libstdc++'s inline reference
// counting always uses atomic instructions (as on a glibc older than 2.32).
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;
#endif

// libstdc++'s out-of-line exception_ptr destructor of CXXABI_1.3.3 (before GCC 11 made it inline),
// bound by version so that no inline copy of the destructor emitted in _C can stand in for it.
extern "C" void kfac_fast_exception_ptr_dtor(void* self) noexcept;
__asm__(".symver kfac_fast_exception_ptr_dtor,_ZNSt15__exception_ptr13exception_ptrD1Ev@CXXABI_1.3.3");

namespace std {

// GLIBCXX_3.4.29 (GCC 11): thrown by std::allocator<T>::allocate for an impossible element count.
void __throw_bad_array_new_length() { __cxxabiv1::__cxa_throw_bad_array_new_length(); }

namespace __exception_ptr {

// CXXABI_1.3.13 (GCC 11): called by exception_ptr's inline copy constructor and destructor.
// One more reference: libstdc++'s exception_ptr(void*) constructor (CXXABI_1.3.11) takes one,
// and the object it builds is never destroyed.
void exception_ptr::_M_addref() noexcept {
  if (_M_exception_object) {
    alignas(exception_ptr) unsigned char holder[sizeof(exception_ptr)];
    ::new (static_cast<void*>(holder)) exception_ptr(_M_exception_object);
  }
}

// One reference less: the old destructor run on a bitwise copy that owns this reference
// (it frees the exception when the count reaches zero).
void exception_ptr::_M_release() noexcept {
  if (_M_exception_object) {
    alignas(exception_ptr) unsigned char copy[sizeof(exception_ptr)];
    std::memcpy(copy, static_cast<const void*>(this), sizeof(exception_ptr));
    kfac_fast_exception_ptr_dtor(copy);
  }
}

}  // namespace __exception_ptr
}  // namespace std
#endif  // KFAC_FAST_MANYLINUX_COMPAT
