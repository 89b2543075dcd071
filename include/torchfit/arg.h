#pragma once
/// \file
/// `TORCHFIT_ARG(T, name) = default;` declares an option with a chainable setter and
/// a getter, as LibTorch's `TORCH_ARG` does.
///
///     struct MyOptions {
///       TORCHFIT_ARG(double, factor) = 0.1;   // MyOptions().factor(0.5).factor() == 0.5
///     };

#define TORCHFIT_ARG(T, name)                              \
 public:                                                   \
  auto& name(const T& new_##name) {                        \
    this->name##_ = new_##name;                            \
    return *this;                                          \
  }                                                        \
  const T& name() const noexcept { return this->name##_; } \
                                                           \
 private:                                                  \
  T name##_
