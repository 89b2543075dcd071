#include "engine/filepath_template.h"

#include <gtest/gtest.h>

#include <limits>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

/// `format(value, spec)` in Python is `expected`.
struct PythonCase {
  double value;
  const char* spec;
  const char* expected;
};

/// Formats `value` through the field "{x:<spec>}", as an int when `integer`.
std::string format_one(double value, const std::string& spec, bool integer) {
  const FilepathTemplate path(spec.empty() ? "{x}" : "{x:" + spec + "}");
  return path.format({{"x", value}}, integer ? std::set<std::string>{"x"} : std::set<std::string>{});
}

/// The message of the ValueError that formatting `pattern` throws.
std::string error_of(const std::string& pattern, const Logs& values, const std::set<std::string>& integers = {}) {
  try {
    FilepathTemplate(pattern).format(values, integers);
  } catch (const ValueError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected ValueError for " << pattern;
  return "";
}

std::string expected_error(const std::string& pattern, const std::string& reason, const std::string& keys) {
  return "Failed to format this callback filepath: \"" + pattern + "\". Reason: " + reason +
         "; available keys: " + keys;
}

TEST(FilepathTemplateTest, KeepsCheckpointCallbackExpectations) {
  const std::set<std::string> positions{"epoch", "batch"};
  const auto at = [](double epoch, std::optional<double> batch = std::nullopt) {
    Logs logs{{"val_loss", 0.123456}, {"accuracy", 0.5}, {"epoch", epoch}};
    if (batch) logs["batch"] = *batch;
    return logs;
  };
  EXPECT_EQ(FilepathTemplate("ckpt/{epoch:02d}-{val_loss:.2f}.pt").format(at(3), positions), "ckpt/03-0.12.pt");
  EXPECT_EQ(FilepathTemplate("{epoch:03d}b{batch}-{accuracy:.1%}").format(at(1, 5), positions), "001b5-50.0%");
  EXPECT_EQ(FilepathTemplate("{{literal}}-{epoch}").format(at(1), positions), "{literal}-1");
  EXPECT_EQ(FilepathTemplate("{accuracy:%}|{val_loss:e}|{epoch:>3}").format(at(5), positions),
            "50.000000%|1.234560e-01|  5");
}

// Expected strings: /usr/bin/python3 -c 'import sys; print(format(float(sys.argv[1]), sys.argv[2]))' VALUE SPEC
// (Python 3.11.2; VALUE nan, -nan, inf, -inf for kNaN, -kNaN, kInf, -kInf).
TEST(FilepathTemplateTest, FloatsFormatLikePython) {
  const PythonCase cases[] = {
      {1.0, "", "1.0"},
      {0.1, "", "0.1"},
      {1e+16, "", "1e+16"},
      {1.5e-05, "", "1.5e-05"},
      {123456789.0, "", "123456789.0"},
      {kNaN, "", "nan"},
      {kInf, "", "inf"},
      {-kInf, "", "-inf"},
      {-0.0, "", "-0.0"},
      {5e-324, "", "5e-324"},
      {1.7976931348623157e+308, "", "1.7976931348623157e+308"},
      {9999999999999998.0, "", "9999999999999998.0"},
      {0.0001, "", "0.0001"},
      {0.6666666666666666, "", "0.6666666666666666"},
      {1000000000000000.0, "", "1000000000000000.0"},
      {100.0, "", "100.0"},
      {1e+22, "", "1e+22"},
      {2.0, ".3", "2.0"},
      {1234.5678, ".3", "1.23e+03"},
      {123.0, ".3", "1.23e+02"},
      {123.0, ".4", "123.0"},
      {12.0, ".3", "12.0"},
      {100.0, ".3", "1e+02"},
      {0.00012345, ".3", "0.000123"},
      {1e-05, ".3", "1e-05"},
      {0.0001, ".3", "0.0001"},
      {9.9999, ".3", "10.0"},
      {999.9, ".3", "1e+03"},
      {1.5, ".0", "2e+00"},
      {0.5, ".0", "0.5"},
      {1e+20, ".3", "1e+20"},
      {1e+16, ".17", "1e+16"},
      {-0.0, ".3", "-0.0"},
      {2.0, "#.3", "2.00"},
      {1e+16, "#.3", "1.00e+16"},
      {1.0, ">8", "     1.0"},
      {1.0, "08", "000001.0"},
      {-1.0, "08", "-00001.0"},
      {1.0, "#", "1.0"},
      {1e+16, "#", "1.e+16"},
      {100.0, "#", "100.0"},
      {1.0, "+", "+1.0"},
      {1.0, " ", " 1.0"},
      {1.0, "^10", "   1.0    "},
      {1.0, "+.2", "+1.0"},
      {1.0, "*^+9", "**+1.0***"},
      {-1.5, "=8", "-    1.5"},
      {1.5, "x<8", "1.5xxxxx"},
      {1.5, "<08", "1.500000"},
      {1.5, "0<6", "1.5000"},
      {1.5, "€^7", "€€1.5€€"},
      {kNaN, "05", "00nan"},
      {kNaN, "+", "+nan"},
      {-kNaN, "", "nan"},
      {0.5, "%", "50.000000%"},
      {0.5, ".1%", "50.0%"},
      {0.5, ".0%", "50%"},
      {0.5, "#.0%", "50.%"},
      {kNaN, "%", "nan%"},
      {0.1234, "e", "1.234000e-01"},
      {0.1234, "E", "1.234000E-01"},
      {0.0, "e", "0.000000e+00"},
      {0.123456, ".4f", "0.1235"},
      {-0.001, ".1f", "-0.0"},
      {2.5, ".0f", "2"},
      {3.5, ".0f", "4"},
      {0.125, ".2f", "0.12"},
      {kInf, "08f", "00000inf"},
      {kInf, "F", "INF"},
      {kNaN, "F", "NAN"},
      {-kInf, "G", "-INF"},
      {kInf, "+e", "+inf"},
      {0.1, "g", "0.1"},
      {0.123456789, "g", "0.123457"},
      {1e+16, "g", "1e+16"},
      {123456789.0, "g", "1.23457e+08"},
      {1.0, "#g", "1.00000"},
      {1.0, "#.0e", "1.e+00"},
      {1.0, "#.0f", "1."},
      {1e-05, ".2G", "1E-05"},
      {2.5, "n", "2.5"},
      {5.0, "n", "5"},
      {1e+16, "n", "1e+16"},
      {-1.5, "*=+9.2f", "-****1.50"},
      {1234.5, "010.2f", "0001234.50"},
      {1234.5, "^12.1f", "   1234.5   "},
      {-2.25, " .1f", "-2.2"},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(format_one(c.value, c.spec, false), c.expected) << c.value << " with '" << c.spec << "'";
  }
}

// Expected strings: /usr/bin/python3 -c 'import sys; print(format(int(sys.argv[1]), sys.argv[2]))' VALUE SPEC
TEST(FilepathTemplateTest, IntegerKeysFormatLikePythonInts) {
  const PythonCase cases[] = {
      {3, "", "3"},
      {3, "02d", "03"},
      {3, ">3", "  3"},
      {3, ".2f", "3.00"},
      {3, "%", "300.000000%"},
      {3, "e", "3.000000e+00"},
      {3, "g", "3"},
      {100000000000000000, "g", "1e+17"},
      {3, "n", "3"},
      {-3, " d", "-3"},
      {3, " ", " 3"},
      {3, "+d", "+3"},
      {255, "#x", "0xff"},
      {-255, "#x", "-0xff"},
      {255, "#X", "0XFF"},
      {255, "x", "ff"},
      {15, "#o", "0o17"},
      {5, "#b", "0b101"},
      {5, "b", "101"},
      {5, "#d", "5"},
      {5, "<03d", "500"},
      {5, "<03", "500"},
      {-5, "05d", "-0005"},
      {-5, "#010x", "-0x0000005"},
      {5, "=5", "    5"},
      {5, "x=+5", "+xxx5"},
      {5, "0=5", "00005"},
      {5, ">05", "00005"},
      {5, "^5", "  5  "},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(format_one(c.value, c.spec, true), c.expected) << c.value << " with '" << c.spec << "'";
  }
}

// Python rejects integer codes on floats, but Trainer logs are doubles, so an integral value
// formats as int(value). Expected strings: the int command above.
TEST(FilepathTemplateTest, IntegralFloatsTakeIntegerCodes) {
  const PythonCase cases[] = {
      {5.0, "06d", "000005"},
      {5.0, "d", "5"},
      {-7.0, "+d", "-7"},
      {255.0, "#x", "0xff"},
      {255.0, "X", "FF"},
      {8.0, "o", "10"},
      {5.0, "#b", "0b101"},
      {-0.0, "d", "0"},
      {1000000000000000.0, "d", "1000000000000000"},
      {3.0, ">4d", "   3"},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(format_one(c.value, c.spec, false), c.expected) << c.value << " with '" << c.spec << "'";
  }
}

TEST(FilepathTemplateTest, ComputedNaNPrintsWithoutSign) {
  volatile double zero = 0.0;
  const double nan = zero / zero;  // negative on x86; Python prints every NaN as "nan"
  EXPECT_EQ(format_one(nan, "", false), "nan");
  EXPECT_EQ(format_one(nan, ".2f", false), "nan");
  EXPECT_EQ(format_one(nan, "+", false), "+nan");
}

TEST(FilepathTemplateTest, IntegerKeyWithoutIntegralValueFormatsAsFloat) {
  EXPECT_EQ(format_one(2.5, "", true), "2.5");
  EXPECT_EQ(format_one(kInf, "", true), "inf");
}

TEST(FilepathTemplateTest, FieldsInOrderEachOnce) {
  const FilepathTemplate path("ckpt/{epoch:02d}-{val_loss:.2f}-{epoch}{{batch}}.pt");
  EXPECT_EQ(path.pattern(), "ckpt/{epoch:02d}-{val_loss:.2f}-{epoch}{{batch}}.pt");
  EXPECT_EQ(path.fields(), (std::vector<std::string>{"epoch", "val_loss"}));
  EXPECT_TRUE(FilepathTemplate("{{literal}}.pt").fields().empty());
}

TEST(FilepathTemplateTest, LiteralDirectoryIsBeforeTheFirstField) {
  EXPECT_EQ(FilepathTemplate("ckpt/run/{epoch}.pt").literal_directory(), "ckpt/run");
  EXPECT_EQ(FilepathTemplate("ckpt/run/ep{epoch}/model.pt").literal_directory(), "ckpt/run");
  EXPECT_EQ(FilepathTemplate("ckpt/run{epoch}/model.pt").literal_directory(), "ckpt");
  EXPECT_EQ(FilepathTemplate("{epoch}.pt").literal_directory(), "");
  EXPECT_EQ(FilepathTemplate("model.pt").literal_directory(), "");
  EXPECT_EQ(FilepathTemplate("ckpt/model.pt").literal_directory(), "ckpt");
  EXPECT_EQ(FilepathTemplate("/abs/{epoch}.pt").literal_directory(), "/abs");
  EXPECT_EQ(FilepathTemplate("{{x}}/{epoch}.pt").literal_directory(), "{x}");
}

TEST(FilepathTemplateTest, MatchesResultsOfFormat) {
  const FilepathTemplate path("ckpt/{epoch:02d}-{val_loss:.2f}.pt");
  EXPECT_TRUE(path.matches("ckpt/03-0.12.pt"));
  EXPECT_TRUE(path.matches("ckpt/1e+03-nan.pt"));
  EXPECT_TRUE(path.matches(path.format({{"epoch", 7}, {"val_loss", 0.5}}, {"epoch"})));
  EXPECT_FALSE(path.matches("ckpt/03-0.12.pt.tmp"));
  EXPECT_FALSE(path.matches("other/03-0.12.pt"));
  EXPECT_FALSE(path.matches("ckpt/sub/03-0.12.pt"));  // a field never holds '/'
  EXPECT_FALSE(path.matches("ckpt/-0.12.pt"));        // nor is it empty

  EXPECT_TRUE(FilepathTemplate("{{x}}-{epoch}").matches("{x}-1"));
  EXPECT_FALSE(FilepathTemplate("{{x}}-{epoch}").matches("{{x}}-1"));
  EXPECT_TRUE(FilepathTemplate("ckpt/m(best)+[1].*{epoch}$").matches("ckpt/m(best)+[1].*7$"));
  EXPECT_FALSE(FilepathTemplate("ckpt/m.{epoch}").matches("ckpt/mx7"));
  EXPECT_TRUE(FilepathTemplate("{epoch}{step}.pt").matches("12.pt"));
  EXPECT_TRUE(FilepathTemplate("model.pt").matches("model.pt"));
  EXPECT_FALSE(FilepathTemplate("model.pt").matches("model.pt2"));
}

TEST(FilepathTemplateTest, PatternThatAlwaysFailsMatchesNothing) {
  EXPECT_FALSE(FilepathTemplate("ckpt/{epoch").matches("ckpt/{epoch"));
  EXPECT_FALSE(FilepathTemplate("ckpt/{epoch:.2q}").matches("ckpt/1"));
}

TEST(FilepathTemplateTest, MissingKeyListsAvailableKeys) {
  const std::string pattern = "ckpt/{val_acc:.2f}.pt";
  EXPECT_EQ(error_of(pattern, {{"epoch", 1}, {"loss", 0.5}, {"val_loss", 0.25}}),
            expected_error(pattern, "missing key 'val_acc'", "epoch, loss, val_loss"));
  EXPECT_EQ(error_of("{batch}", {}), expected_error("{batch}", "missing key 'batch'", ""));
}

TEST(FilepathTemplateTest, NonIntegralValueUnderIntegerCodeFails) {
  const auto reason = [](const char* field, const char* code, const char* value) {
    return std::string("field '") + field + "': format code '" + code + "' is for integers, but its value " + value +
           " is not an integer";
  };
  EXPECT_EQ(error_of("{step:06d}", {{"step", 2.5}}), expected_error("{step:06d}", reason("step", "d", "2.5"), "step"));
  EXPECT_EQ(error_of("{loss:x}", {{"loss", kNaN}}), expected_error("{loss:x}", reason("loss", "x", "nan"), "loss"));
  // Beyond 64 bits, where no counter goes.
  EXPECT_EQ(error_of("{loss:d}", {{"loss", 1e20}}), expected_error("{loss:d}", reason("loss", "d", "1e+20"), "loss"));
}

TEST(FilepathTemplateTest, MalformedPatternsFailWithTheReason) {
  struct Case {
    const char* pattern;
    const char* reason;
  };
  const Case cases[] = {
      // Python's own messages.
      {"{epoch:.2q}", "field 'epoch': Unknown format code 'q'"},
      {"{epoch:s}", "field 'epoch': Unknown format code 's'"},
      {"{epoch:.2qq}", "field 'epoch': Invalid format specifier '.2qq'"},
      {"{epoch:00>5}", "field 'epoch': Invalid format specifier '00>5'"},
      {"{epoch:.f}", "field 'epoch': Format specifier missing precision"},
      {"{epoch:.2}", "field 'epoch': Precision not allowed in integer format specifier"},
      {"{epoch:.2d}", "field 'epoch': Precision not allowed in integer format specifier"},
      {"{epoch:99999999999}", "field 'epoch': Too many decimal digits in format string"},
      {"ckpt/{", "Single '{' encountered in format string"},
      {"ckpt/}", "Single '}' encountered in format string"},
      {"{epoch}}", "Single '}' encountered in format string"},
      {"ckpt/{epoch", "expected '}' before end of string"},
      {"ckpt/{epoch:02d", "unmatched '{' in format spec"},
      // What Python accepts but a filepath template does not.
      {"{loss!r}", "conversions are not supported: '{loss!r}'"},
      {"{}", "positional fields are not supported; name a log key: '{}'"},
      {"{:>3}", "positional fields are not supported; name a log key: '{:>3}'"},
      {"{loss.real}", "attribute and index lookups are not supported: '{loss.real}'"},
      {"{loss[0]}", "attribute and index lookups are not supported: '{loss[0]}'"},
      {"{loss:{width}}", "nested replacement fields are not supported: '{loss:{width}}'"},
      {"{loss:,}", "field 'loss': grouping with ',' is not supported"},
      {"{loss:_.2f}", "field 'loss': grouping with '_' is not supported"},
      {"{loss:z.2f}", "field 'loss': the 'z' option is not supported"},
      {"{epoch:c}", "field 'epoch': format code 'c' is not supported"},
  };
  const Logs values{{"epoch", 1}, {"loss", 0.5}};
  for (const auto& c : cases) {
    EXPECT_EQ(error_of(c.pattern, values, {"epoch"}), expected_error(c.pattern, c.reason, "epoch, loss"));
  }
}

// Python formats left to right and looks a key up before it reads the spec:
// "{missing}{".format() raises KeyError, "{epoch:.2q}{missing}".format(epoch=1) ValueError.
TEST(FilepathTemplateTest, ReportsTheFirstErrorPythonWould) {
  const Logs values{{"epoch", 1}};
  EXPECT_EQ(error_of("{missing}{", values), expected_error("{missing}{", "missing key 'missing'", "epoch"));
  EXPECT_EQ(error_of("{missing:.2q}", values), expected_error("{missing:.2q}", "missing key 'missing'", "epoch"));
  EXPECT_EQ(error_of("{epoch:.2q}{missing}", values),
            expected_error("{epoch:.2q}{missing}", "field 'epoch': Unknown format code 'q'", "epoch"));
}

}  // namespace
}  // namespace torchfit::detail
