// ProgbarLogger through the "torchfit" logger: a live bar on a terminal, plain lines on a pipe.
#include <fcntl.h>
#include <pty.h>
#include <termios.h>
#include <unistd.h>

#include <regex>

#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

#include "support.h"

namespace torchfit::test {
namespace {

class ProgbarTest : public TorchfitTest {
 protected:
  /// Runs a 2-epoch fit (3 steps an epoch) with the logger writing to `stream`
  /// (and to `other`, if given).
  History fit_into(std::FILE* stream, int verbose, spdlog::sink_ptr other = nullptr) {
    auto log = logger();
    auto saved = log->sinks();
    log->sinks() = {std::make_shared<TerminalSink>(stream)};
    if (other) log->sinks().push_back(other);
    auto data = make_data();
    auto s = make_setup();
    History history;
    try {
      history = s.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(2).batch_size(10).verbose(verbose));
    } catch (...) {
      log->sinks() = saved;
      throw;
    }
    log->sinks() = saved;
    std::fflush(stream);
    return history;
  }

  static std::string drain(int fd) {
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    std::string out;
    char buffer[4096];
    for (ssize_t n; (n = ::read(fd, buffer, sizeof buffer)) > 0;) out.append(buffer, static_cast<size_t>(n));
    return out;
  }

  static std::string mask_timings(const std::string& text) {
    auto out = std::regex_replace(text, std::regex(R"(ETA: \d+s)"), "ETA: Xs");
    out = std::regex_replace(out, std::regex(R"(\d+s - \d+ms/step)"), "Xs - Xms/step");
    return std::regex_replace(out, std::regex(R"(\d+s \d+ms/step)"), "Xs Xms/step");
  }

  static std::string epoch_line(const History& h, size_t e) {
    return fmt::format("[torchfit] [info] Epoch {}/2 - 3 steps - Xs - Xms/step - accuracy: {:.4f} - loss: {:.4f}\n",
                       e + 1, h.history.at("accuracy")[e], h.history.at("loss")[e]);
  }
};

TEST_F(ProgbarTest, PipeGetsOneLinePerEpochWithoutControlCharacters) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  std::FILE* writer = ::fdopen(fds[1], "w");
  EXPECT_FALSE(TerminalSink(writer).is_terminal());
  auto history = fit_into(writer, 1);
  std::fclose(writer);
  auto text = drain(fds[0]);
  ::close(fds[0]);
  EXPECT_EQ(mask_timings(text), epoch_line(history, 0) + epoch_line(history, 1));
  EXPECT_EQ(text.find('\r'), std::string::npos);
  EXPECT_EQ(text.find('\x1b'), std::string::npos);
}

TEST_F(ProgbarTest, TerminalGetsALiveBarThatTheEpochLineReplaces) {
  int master = -1, slave = -1;
  if (::openpty(&master, &slave, nullptr, nullptr, nullptr) != 0) GTEST_SKIP() << "no pseudo-terminal here";
  termios raw{};
  ::tcgetattr(slave, &raw);
  ::cfmakeraw(&raw);  // no \n -> \r\n translation, so the text is what was written
  ::tcsetattr(slave, TCSANOW, &raw);
  std::FILE* writer = ::fdopen(slave, "w");
  EXPECT_TRUE(TerminalSink(writer).is_terminal());
  auto history = fit_into(writer, 1);
  auto text = mask_timings(drain(master));
  std::fclose(writer);
  ::close(master);
  // The header is drawn as the epoch begins, the first step at once, the last
  // always; the epoch line replaces the bar.
  auto header = "\rEpoch 1/2\x1b[K";
  auto first = "\rEpoch 1/2 - 1/3 [=========>....................] - ETA: Xs";
  auto last = "\rEpoch 1/2 - 3/3 [==============================] - Xs Xms/step";
  auto replace = "\r\x1b[K" + epoch_line(history, 0);
  auto at_header = text.find(header), at_first = text.find(first), at_last = text.find(last),
       at_replace = text.find(replace);
  ASSERT_NE(at_header, std::string::npos) << text;
  ASSERT_NE(at_first, std::string::npos) << text;
  EXPECT_LT(at_header, at_first);
  ASSERT_NE(at_last, std::string::npos) << text;
  ASSERT_NE(at_replace, std::string::npos) << text;
  EXPECT_LT(at_first, at_last);
  EXPECT_LT(at_last, at_replace);
  EXPECT_NE(text.find("\r\x1b[K" + epoch_line(history, 1)), std::string::npos) << text;
}

TEST_F(ProgbarTest, OtherSinksGetNoProgressRedraws) {
  int master = -1, slave = -1;
  if (::openpty(&master, &slave, nullptr, nullptr, nullptr) != 0) GTEST_SKIP() << "no pseudo-terminal here";
  std::FILE* writer = ::fdopen(slave, "w");
  // Stands for a file sink: it sees exactly what the logger logs.
  auto file = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(100);
  file->set_pattern("%v");
  auto history = fit_into(writer, 1, file);
  auto terminal = drain(master);
  std::fclose(writer);
  ::close(master);
  EXPECT_NE(terminal.find("Epoch 2/2 - 1/3 ["), std::string::npos) << terminal;  // the terminal had the bar
  auto lines = file->last_formatted();
  ASSERT_EQ(lines.size(), 2u);
  for (size_t e = 0; e < 2; ++e) {
    EXPECT_EQ(mask_timings("[torchfit] [info] " + lines[e]), epoch_line(history, e));
    EXPECT_EQ(lines[e].find('\r'), std::string::npos);
  }
}

TEST_F(ProgbarTest, LoaderStepsAreLearntInTheFirstEpoch) {
  int master = -1, slave = -1;
  if (::openpty(&master, &slave, nullptr, nullptr, nullptr) != 0) GTEST_SKIP() << "no pseudo-terminal here";
  std::FILE* writer = ::fdopen(slave, "w");
  auto log = logger();
  auto saved = log->sinks();
  log->sinks() = {std::make_shared<TerminalSink>(writer)};
  // Any range of batches is a loader; this one cannot tell its length.
  auto data = make_data();
  std::vector<torch::data::Example<>> loader;
  for (int64_t start = 0; start < 30; start += 10) {
    loader.push_back({data.x_train.narrow(0, start, 10), data.y_train.narrow(0, start, 10)});
  }
  auto s = make_setup();
  s.trainer->fit(loader, FitOptions().epochs(2).verbose(1));
  log->sinks() = saved;
  std::fflush(writer);
  auto text = drain(master);
  std::fclose(writer);
  ::close(master);
  EXPECT_NE(text.find("Epoch 1/2 - 1/Unknown"), std::string::npos) << text;
  EXPECT_NE(text.find("Epoch 2/2 - 1/3 [=========>....................] - ETA: "), std::string::npos) << text;
}

TEST_F(ProgbarTest, VerboseTwoIsOneLinePerEpochEvenOnATerminal) {
  int master = -1, slave = -1;
  if (::openpty(&master, &slave, nullptr, nullptr, nullptr) != 0) GTEST_SKIP() << "no pseudo-terminal here";
  termios raw{};
  ::tcgetattr(slave, &raw);
  ::cfmakeraw(&raw);
  ::tcsetattr(slave, TCSANOW, &raw);
  std::FILE* writer = ::fdopen(slave, "w");
  auto history = fit_into(writer, 2);
  auto text = drain(master);
  std::fclose(writer);
  ::close(master);
  EXPECT_EQ(mask_timings(text), epoch_line(history, 0) + epoch_line(history, 1));
}

TEST_F(ProgbarTest, VerboseZeroIsSilent) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  std::FILE* writer = ::fdopen(fds[1], "w");
  fit_into(writer, 0);
  std::fclose(writer);
  EXPECT_EQ(drain(fds[0]), "");
  ::close(fds[0]);
}

TEST_F(ProgbarTest, Bar) {
  EXPECT_EQ(ProgbarLogger::bar(0, 10), "[..............................]");
  EXPECT_EQ(ProgbarLogger::bar(5, 10), "[==============>...............]");
  EXPECT_EQ(ProgbarLogger::bar(10, 10), "[==============================]");
  EXPECT_EQ(ProgbarLogger::format_logs({{"loss", 0.5}, {"lr", 1e-4}}), " - loss: 0.5000 - lr: 1.0000e-04");
}

}  // namespace
}  // namespace torchfit::test
