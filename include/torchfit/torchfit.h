#pragma once
/// \file
/// Everything public in torchfit.

#include "torchfit/callback.h"
#include "torchfit/callbacks/backup_and_restore.h"
#include "torchfit/callbacks/checkpoint.h"
#include "torchfit/callbacks/csv_logger.h"
#include "torchfit/callbacks/early_stopping.h"
#include "torchfit/callbacks/lambda_callback.h"
#include "torchfit/callbacks/learning_rate.h"
#include "torchfit/callbacks/monitor.h"
#include "torchfit/callbacks/progbar_logger.h"
#include "torchfit/callbacks/terminate_on_nan.h"
#include "torchfit/distributed.h"
#include "torchfit/error.h"
#include "torchfit/log.h"
#include "torchfit/logs.h"
#include "torchfit/metrics.h"
#include "torchfit/mode.h"
#include "torchfit/serialize.h"
#include "torchfit/trainer.h"
#include "torchfit/trainer_state.h"
