#pragma once
/// \file
/// CSVLogger: one CSV row of epoch logs per epoch (Keras semantics).
///
///     auto csv = std::make_shared<torchfit::CSVLogger>("logs/run1.csv", ',', /*append=*/true);
///     trainer.fit(x, y, torchfit::FitOptions().epochs(5).callbacks({csv}));  // epoch,loss,accuracy,...

#include <fstream>
#include <string>
#include <vector>

#include "torchfit/callback.h"

namespace torchfit {

/// Writes `epoch` plus the sorted log keys of each epoch to `filename`. With
/// `append`, a later run continues the file without repeating the header. A
/// run resumed by `Trainer::load_checkpoint` or BackupAndRestore always does,
/// and first drops the rows of the epochs it will run again. The directory is
/// created and checked for writing when the fit starts.
class CSVLogger : public Callback {
 public:
  explicit CSVLogger(std::string filename, char separator = ',', bool append = false);

  void on_train_begin(const Logs& logs) override;
  void on_epoch_end(int64_t epoch, const Logs& logs) override;
  void on_train_end(const Logs& logs) override;

 private:
  std::string filename_;
  char separator_;
  bool append_;
  bool write_header_ = true;
  bool enabled_ = true;
  std::vector<std::string> keys_;
  std::ofstream file_;
};

}  // namespace torchfit
