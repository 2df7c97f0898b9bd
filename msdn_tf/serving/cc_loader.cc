// Minimal C++ SavedModel checker for msdn-tf.
//
// Loads a SavedModel with tensorflow::LoadSavedModel and the "serve" tag --
// the same C++ loader TensorFlow Serving uses -- so an export that fails here
// will also fail in TF Serving.
//
// Usage:
//   cc_loader inspect EXPORT_DIR
//       Prints {"export_dir":..., "tags":["serve"], "signatures":{...}} as JSON.
//   cc_loader run EXPORT_DIR SIGNATURE OUT_DIR [ARG ...]
//       ARG is one of
//         name=path.npy    numeric input (little-endian, C order; dtypes
//                          f4 f8 i1 i2 i4 i8 u1 u2 b1)
//         name@path        one element of a 1-D DT_STRING input; repeat the
//                          argument once per batch element, in order
//       Writes every signature output to OUT_DIR/<key>.npy (numeric) or
//       OUT_DIR/<key>.strs (strings: uint64 count, then per element uint64
//       length + raw bytes, all little-endian) and prints a JSON summary.
//
// Errors: message on stderr prefixed with "cc_loader error:", exit code 1
// (bad usage 2).

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.pb.h"

namespace {

using tensorflow::DataType;
using tensorflow::Tensor;
using tensorflow::TensorShape;

struct Failure {
  std::string msg;
};

[[noreturn]] void Fail(const std::string& msg) { throw Failure{msg}; }

std::string JsonEscape(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

// ---------------------------------------------------------------- dtypes --

struct NpyType {
  const char* descr;  // numpy descr, little-endian
  DataType dtype;
  size_t itemsize;
};

const NpyType kNpyTypes[] = {
    {"<f4", tensorflow::DT_FLOAT, 4},  {"<f8", tensorflow::DT_DOUBLE, 8},
    {"|i1", tensorflow::DT_INT8, 1},   {"<i2", tensorflow::DT_INT16, 2},
    {"<i4", tensorflow::DT_INT32, 4},  {"<i8", tensorflow::DT_INT64, 8},
    {"|u1", tensorflow::DT_UINT8, 1},  {"<u2", tensorflow::DT_UINT16, 2},
    {"|b1", tensorflow::DT_BOOL, 1},
};

const NpyType* TypeFromDescr(const std::string& descr) {
  std::string d = descr;
  // numpy writes '|' for 1-byte types, accept '<' / '=' as well.
  if (d.size() == 3 && (d[0] == '<' || d[0] == '=' || d[0] == '|')) {
    for (const auto& t : kNpyTypes) {
      if (d.substr(1) == std::string(t.descr).substr(1)) return &t;
    }
  }
  return nullptr;
}

const NpyType* TypeFromDtype(DataType dt) {
  for (const auto& t : kNpyTypes) {
    if (t.dtype == dt) return &t;
  }
  return nullptr;
}

// ------------------------------------------------------------------ .npy --

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail("cannot open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Returns the value text following 'key': in a numpy header dict.
std::string HeaderField(const std::string& header, const std::string& key,
                        const std::string& path) {
  const std::string k = "'" + key + "'";
  size_t p = header.find(k);
  if (p == std::string::npos) Fail(path + ": npy header lacks " + key);
  p = header.find(':', p + k.size());
  if (p == std::string::npos) Fail(path + ": bad npy header");
  ++p;
  while (p < header.size() && header[p] == ' ') ++p;
  if (p >= header.size()) Fail(path + ": bad npy header");
  if (header[p] == '\'') {
    size_t e = header.find('\'', p + 1);
    if (e == std::string::npos) Fail(path + ": bad npy header");
    return header.substr(p + 1, e - p - 1);
  }
  if (header[p] == '(') {
    size_t e = header.find(')', p);
    if (e == std::string::npos) Fail(path + ": bad npy header");
    return header.substr(p + 1, e - p - 1);
  }
  size_t e = header.find_first_of(",}", p);
  return header.substr(p, e - p);
}

Tensor ReadNpy(const std::string& path) {
  const std::string data = ReadFile(path);
  if (data.size() < 10 || data.compare(0, 6, "\x93NUMPY") != 0) {
    Fail(path + ": not a .npy file");
  }
  const unsigned char major = static_cast<unsigned char>(data[6]);
  size_t header_len, offset;
  if (major == 1) {
    header_len = static_cast<unsigned char>(data[8]) |
                 (static_cast<size_t>(static_cast<unsigned char>(data[9])) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (data.size() < 12) Fail(path + ": truncated .npy header");
    header_len = 0;
    for (int i = 0; i < 4; ++i) {
      header_len |= static_cast<size_t>(static_cast<unsigned char>(data[8 + i]))
                    << (8 * i);
    }
    offset = 12;
  } else {
    Fail(path + ": unsupported .npy version " + std::to_string(major));
  }
  if (data.size() < offset + header_len) Fail(path + ": truncated .npy header");
  const std::string header = data.substr(offset, header_len);
  offset += header_len;

  const std::string descr = HeaderField(header, "descr", path);
  const NpyType* type = TypeFromDescr(descr);
  if (type == nullptr) {
    Fail(path + ": unsupported dtype '" + descr +
         "' (supported: float32/64, int8/16/32/64, uint8/16, bool; "
         "little-endian)");
  }
  if (HeaderField(header, "fortran_order", path).find("True") !=
      std::string::npos) {
    Fail(path + ": fortran_order arrays are not supported");
  }
  std::vector<int64_t> dims;
  std::stringstream shape_ss(HeaderField(header, "shape", path));
  std::string item;
  while (std::getline(shape_ss, item, ',')) {
    size_t b = item.find_first_not_of(" ");
    if (b == std::string::npos) continue;
    dims.push_back(std::stoll(item.substr(b)));
  }
  TensorShape shape;
  for (int64_t d : dims) shape.AddDim(d);
  Tensor t(type->dtype, shape);
  const size_t nbytes = static_cast<size_t>(shape.num_elements()) * type->itemsize;
  if (data.size() - offset != nbytes) {
    Fail(path + ": expected " + std::to_string(nbytes) + " data bytes, found " +
         std::to_string(data.size() - offset));
  }
  if (nbytes > 0) {
    std::memcpy(const_cast<char*>(t.tensor_data().data()), data.data() + offset,
                nbytes);
  }
  return t;
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) Fail("cannot write " + path);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f) Fail("cannot write " + path);
}

void WriteNpy(const std::string& path, const Tensor& t, const NpyType& type) {
  std::string shape = "(";
  for (int i = 0; i < t.dims(); ++i) {
    shape += std::to_string(t.dim_size(i));
    if (t.dims() == 1 || i + 1 < t.dims()) shape += ",";
    if (i + 1 < t.dims()) shape += " ";
  }
  shape += ")";
  std::string header = std::string("{'descr': '") + type.descr +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  // magic(6) + version(2) + len(2) + header + '\n' padded to 64 bytes.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>((header.size() >> 8) & 0xff);
  out += header;
  const auto data = t.tensor_data();
  out.append(data.data(), data.size());
  WriteBytes(path, out);
}

void AppendU64(std::string* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

void WriteStrings(const std::string& path, const Tensor& t) {
  std::string out;
  const auto flat = t.flat<tensorflow::tstring>();
  AppendU64(&out, static_cast<uint64_t>(flat.size()));
  for (int64_t i = 0; i < flat.size(); ++i) {
    AppendU64(&out, flat(i).size());
    out.append(flat(i).data(), flat(i).size());
  }
  WriteBytes(path, out);
}

// --------------------------------------------------------------- loading --

std::string ShapeJson(const tensorflow::TensorShapeProto& shape) {
  if (shape.unknown_rank()) return "null";
  std::string s = "[";
  for (int i = 0; i < shape.dim_size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape.dim(i).size());
  }
  return s + "]";
}

std::string TensorInfoMapJson(
    const google::protobuf::Map<std::string, tensorflow::TensorInfo>& m) {
  // std::map for a deterministic order.
  std::map<std::string, const tensorflow::TensorInfo*> sorted;
  for (const auto& kv : m) sorted[kv.first] = &kv.second;
  std::string s = "{";
  bool first = true;
  for (const auto& kv : sorted) {
    if (!first) s += ", ";
    first = false;
    const auto& info = *kv.second;
    s += JsonEscape(kv.first) + ": {\"name\": " + JsonEscape(info.name()) +
         ", \"dtype\": " + JsonEscape(tensorflow::DataType_Name(info.dtype())) +
         ", \"shape\": " + ShapeJson(info.tensor_shape()) + "}";
  }
  return s + "}";
}

void Load(const std::string& export_dir, tensorflow::SavedModelBundle* bundle) {
  if (!tensorflow::MaybeSavedModelDirectory(export_dir)) {
    Fail("not a SavedModel directory: " + export_dir);
  }
  tensorflow::SessionOptions session_options;
  tensorflow::RunOptions run_options;
  absl::Status st = tensorflow::LoadSavedModel(session_options, run_options,
                                               export_dir, {"serve"}, bundle);
  if (!st.ok()) Fail("LoadSavedModel failed: " + std::string(st.message()));
}

int Inspect(const std::string& export_dir) {
  tensorflow::SavedModelBundle bundle;
  Load(export_dir, &bundle);
  std::map<std::string, const tensorflow::SignatureDef*> sigs;
  for (const auto& kv : bundle.GetSignatures()) sigs[kv.first] = &kv.second;
  std::string s = "{\"export_dir\": " + JsonEscape(export_dir) +
                  ", \"tags\": [\"serve\"], \"signatures\": {";
  bool first = true;
  for (const auto& kv : sigs) {
    if (!first) s += ", ";
    first = false;
    s += JsonEscape(kv.first) + ": {\"method_name\": " +
         JsonEscape(kv.second->method_name()) +
         ", \"inputs\": " + TensorInfoMapJson(kv.second->inputs()) +
         ", \"outputs\": " + TensorInfoMapJson(kv.second->outputs()) + "}";
  }
  s += "}}";
  std::cout << s << std::endl;
  return 0;
}

int Run(const std::string& export_dir, const std::string& signature,
        const std::string& out_dir, const std::vector<std::string>& args) {
  // Parse arguments before loading the (possibly slow) model.
  std::map<std::string, Tensor> numeric;
  std::map<std::string, std::vector<std::string>> strings;
  for (const auto& a : args) {
    size_t eq = a.find('=');
    size_t at = a.find('@');
    if (eq != std::string::npos && (at == std::string::npos || eq < at)) {
      const std::string name = a.substr(0, eq);
      if (numeric.count(name) || strings.count(name)) Fail("input given twice: " + name);
      numeric.emplace(name, ReadNpy(a.substr(eq + 1)));
    } else if (at != std::string::npos) {
      const std::string name = a.substr(0, at);
      if (numeric.count(name)) Fail("input given twice: " + name);
      strings[name].push_back(ReadFile(a.substr(at + 1)));
    } else {
      Fail("bad input argument (want name=file.npy or name@file): " + a);
    }
  }

  tensorflow::SavedModelBundle bundle;
  Load(export_dir, &bundle);
  const auto& sigs = bundle.GetSignatures();
  auto it = sigs.find(signature);
  if (it == sigs.end()) {
    std::string known;
    for (const auto& kv : sigs) known += " " + kv.first;
    Fail("unknown signature '" + signature + "'; available:" + known);
  }
  const tensorflow::SignatureDef& sig = it->second;

  std::vector<std::pair<std::string, Tensor>> feeds;
  for (const auto& kv : sig.inputs()) {
    const std::string& key = kv.first;
    const tensorflow::TensorInfo& info = kv.second;
    if (numeric.count(key)) {
      const Tensor& t = numeric.at(key);
      if (t.dtype() != info.dtype()) {
        Fail("input '" + key + "': signature wants " +
             tensorflow::DataType_Name(info.dtype()) + ", got " +
             tensorflow::DataType_Name(t.dtype()));
      }
      feeds.emplace_back(info.name(), t);
    } else if (strings.count(key)) {
      if (info.dtype() != tensorflow::DT_STRING) {
        Fail("input '" + key + "': signature wants " +
             tensorflow::DataType_Name(info.dtype()) + ", got DT_STRING");
      }
      const auto& elems = strings.at(key);
      Tensor t(tensorflow::DT_STRING,
               TensorShape({static_cast<int64_t>(elems.size())}));
      auto flat = t.flat<tensorflow::tstring>();
      for (size_t i = 0; i < elems.size(); ++i) flat(i) = elems[i];
      feeds.emplace_back(info.name(), t);
    } else {
      Fail("missing input '" + key + "' for signature '" + signature + "'");
    }
  }
  for (const auto& kv : numeric) {
    if (!sig.inputs().count(kv.first)) Fail("unknown input '" + kv.first + "'");
  }
  for (const auto& kv : strings) {
    if (!sig.inputs().count(kv.first)) Fail("unknown input '" + kv.first + "'");
  }

  std::vector<std::string> keys, fetches;
  std::map<std::string, std::string> sorted;
  for (const auto& kv : sig.outputs()) sorted[kv.first] = kv.second.name();
  for (const auto& kv : sorted) {
    keys.push_back(kv.first);
    fetches.push_back(kv.second);
  }
  std::vector<Tensor> outputs;
  absl::Status st = bundle.GetSession()->Run(feeds, fetches, {}, &outputs);
  if (!st.ok()) Fail("Session::Run failed: " + std::string(st.message()));

  std::string s = "{\"signature\": " + JsonEscape(signature) + ", \"outputs\": {";
  for (size_t i = 0; i < keys.size(); ++i) {
    const Tensor& t = outputs[i];
    std::string file;
    if (t.dtype() == tensorflow::DT_STRING) {
      file = out_dir + "/" + keys[i] + ".strs";
      WriteStrings(file, t);
    } else {
      const NpyType* type = TypeFromDtype(t.dtype());
      if (type == nullptr) {
        Fail("output '" + keys[i] + "' has unsupported dtype " +
             tensorflow::DataType_Name(t.dtype()));
      }
      file = out_dir + "/" + keys[i] + ".npy";
      WriteNpy(file, t, *type);
    }
    std::string shape = "[";
    for (int d = 0; d < t.dims(); ++d) {
      if (d) shape += ", ";
      shape += std::to_string(t.dim_size(d));
    }
    shape += "]";
    if (i) s += ", ";
    s += JsonEscape(keys[i]) + ": {\"file\": " + JsonEscape(file) +
         ", \"dtype\": " + JsonEscape(tensorflow::DataType_Name(t.dtype())) +
         ", \"shape\": " + shape + "}";
  }
  s += "}}";
  std::cout << s << std::endl;
  return 0;
}

int Usage() {
  std::cerr << "usage: cc_loader inspect EXPORT_DIR\n"
               "       cc_loader run EXPORT_DIR SIGNATURE OUT_DIR "
               "[name=file.npy | name@bytes_file] ...\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return Usage();
  const std::string cmd = argv[1];
  try {
    if (cmd == "inspect" && argc == 3) return Inspect(argv[2]);
    if (cmd == "run" && argc >= 5) {
      return Run(argv[2], argv[3], argv[4],
                 std::vector<std::string>(argv + 5, argv + argc));
    }
    return Usage();
  } catch (const Failure& f) {
    std::cerr << "cc_loader error: " << f.msg << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "cc_loader error: " << e.what() << std::endl;
    return 1;
  }
}
