// hago_run_vm: run "main" of a Relax VM library (model.so) on the device CPU.
//
//   hago_run_vm MODEL.so IN.hgt OUT.hgt [--repeat N]
//
// Built for aarch64 by tools/install_arm.sh; run on a board or under qemu-aarch64
// (hago/measure/qemu.py). Inputs and outputs use a tiny little-endian tensor file,
// written and read by hago.measure.qemu.save_tensors / load_tensors:
//
//   "HGT1"  uint32 count
//   count x { uint8 code, uint8 bits, uint16 lanes   (a DLDataType)
//             uint32 ndim, int64 shape[ndim], raw row-major bytes }
//
// --repeat N runs main N more times after the first call and prints the mean and
// best wall time per run (meaningless under qemu, useful on a board).
// Errors go to stderr as one line "hago_run_vm: ..." with exit status 1.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

const char kMagic[4] = {'H', 'G', 'T', '1'};

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = aligned_alloc(64, n ? n : 64);
    if (!t->data) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* t) { free(t->data); }
};

void ReadExact(FILE* f, void* dst, size_t n, const char* what) {
  if (n && fread(dst, 1, n, f) != n) throw std::runtime_error(std::string("truncated input file: ") + what);
}

void WriteExact(FILE* f, const void* src, size_t n) {
  if (n && fwrite(src, 1, n, f) != n) throw std::runtime_error("cannot write output file");
}

std::vector<ffi::Tensor> ReadTensors(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) throw std::runtime_error(std::string("cannot open ") + path);
  std::vector<ffi::Tensor> out;
  try {
    char magic[4];
    uint32_t count = 0;
    ReadExact(f, magic, 4, "magic");
    if (memcmp(magic, kMagic, 4) != 0) throw std::runtime_error(std::string(path) + " is not an HGT1 tensor file");
    ReadExact(f, &count, 4, "count");
    for (uint32_t i = 0; i < count; ++i) {
      DLDataType dt;
      uint32_t ndim = 0;
      ReadExact(f, &dt.code, 1, "dtype");
      ReadExact(f, &dt.bits, 1, "dtype");
      ReadExact(f, &dt.lanes, 2, "dtype");
      ReadExact(f, &ndim, 4, "ndim");
      if (ndim > 16) throw std::runtime_error("tensor rank over 16 in input file");
      std::vector<int64_t> shape(ndim);
      ReadExact(f, shape.data(), ndim * sizeof(int64_t), "shape");
      ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()), dt,
                                               DLDevice{kDLCPU, 0});
      ReadExact(f, t.data_ptr(), ffi::GetDataSize(*t.GetDLTensorPtr()), "data");
      out.push_back(t);
    }
  } catch (...) {
    fclose(f);
    throw;
  }
  fclose(f);
  return out;
}

// main returns a tensor or a (nested) tuple of tensors: flatten in order.
void Flatten(const ffi::Any& v, std::vector<ffi::Tensor>* out) {
  if (auto t = v.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = v.as<ffi::Array<ffi::Any>>()) {
    for (size_t i = 0; i < arr->size(); ++i) Flatten((*arr)[i], out);
  } else {
    throw std::runtime_error("main returned something that is neither a tensor nor a tuple: " + v.GetTypeKey());
  }
}

void WriteTensors(const char* path, const std::vector<ffi::Tensor>& ts) {
  FILE* f = fopen(path, "wb");
  if (!f) throw std::runtime_error(std::string("cannot create ") + path);
  uint32_t count = static_cast<uint32_t>(ts.size());
  WriteExact(f, kMagic, 4);
  WriteExact(f, &count, 4);
  for (const ffi::Tensor& t : ts) {
    const DLTensor* d = t.GetDLTensorPtr();
    if (d->device.device_type != kDLCPU || !t.IsContiguous()) {
      fclose(f);
      throw std::runtime_error("an output is not a contiguous CPU tensor");
    }
    uint32_t ndim = static_cast<uint32_t>(d->ndim);
    WriteExact(f, &d->dtype.code, 1);
    WriteExact(f, &d->dtype.bits, 1);
    WriteExact(f, &d->dtype.lanes, 2);
    WriteExact(f, &ndim, 4);
    WriteExact(f, d->shape, ndim * sizeof(int64_t));
    WriteExact(f, static_cast<const char*>(d->data) + d->byte_offset, ffi::GetDataSize(*d));
  }
  if (fclose(f) != 0) throw std::runtime_error("cannot write output file");
}

ffi::Any CallMain(const ffi::Function& f, const std::vector<ffi::Tensor>& inputs) {
  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  ffi::Any ret;
  f.CallPacked(args.data(), static_cast<int32_t>(args.size()), &ret);
  return ret;
}

int Run(int argc, char** argv) {
  std::vector<const char*> pos;
  long repeat = 0;
  for (int i = 1; i < argc; ++i) {
    if (strcmp(argv[i], "--repeat") == 0 && i + 1 < argc) {
      repeat = strtol(argv[++i], nullptr, 10);
    } else {
      pos.push_back(argv[i]);
    }
  }
  if (pos.size() != 3 || repeat < 0) {
    fprintf(stderr, "usage: hago_run_vm MODEL.so IN.hgt OUT.hgt [--repeat N]\n");
    return 2;
  }
  ffi::Module lib = ffi::Module::LoadFromFile(pos[0]);
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  // vm_initialization(device_type, device_id, allocator): kDLCPU = 1, pooled allocator = 2
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  ffi::Function main_fn = vm->GetFunction("main").value();
  std::vector<ffi::Tensor> inputs = ReadTensors(pos[1]);
  std::vector<ffi::Tensor> outputs;
  Flatten(CallMain(main_fn, inputs), &outputs);
  WriteTensors(pos[2], outputs);
  if (repeat > 0) {
    double total = 0, best = 1e300;
    for (long i = 0; i < repeat; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      CallMain(main_fn, inputs);
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      total += ms;
      best = std::min(best, ms);
    }
    printf("repeat %ld: mean %.4f ms, best %.4f ms per run\n", repeat, total / repeat, best);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    fprintf(stderr, "hago_run_vm: %s\n", msg.c_str());
    return 1;
  }
}
