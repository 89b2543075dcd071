# Configures the consumer, which embeds torchfit's source tree with add_subdirectory(), with
# no build type and -DBUILD_TESTING=OFF, then compiles only the consumer's own main.cpp (no
# link), so none of torchfit's sources is compiled. The checks live in the consumer's
# CMakeLists.txt and main.cpp. Variables: TORCHFIT_DIR, SOURCE_DIR, WORK_DIR, GENERATOR,
# CXX_COMPILER, MAKE_PROGRAM (the last two optional).
file(REMOVE_RECURSE "${WORK_DIR}")
include("${CMAKE_CURRENT_LIST_DIR}/../cmake/run.cmake")
set(args -S "${SOURCE_DIR}" -B "${WORK_DIR}" -G "${GENERATOR}" "-DTORCHFIT_DIR=${TORCHFIT_DIR}"
    "-DCMAKE_BUILD_TYPE=" -DBUILD_TESTING=OFF)
if(CXX_COMPILER)
  list(APPEND args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(MAKE_PROGRAM)
  list(APPEND args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
run(${CMAKE_COMMAND} ${args})
if(GENERATOR MATCHES "Ninja")
  set(object CMakeFiles/consumer.dir/main.cpp.o)
  set(wrong_object CMakeFiles/wrong_step.dir/wrong_step.cpp.o)
elseif(GENERATOR MATCHES "Makefiles")
  set(object main.cpp.o)  # the per-directory convenience target; builds no dependencies
  set(wrong_object wrong_step.cpp.o)
else()
  message(FATAL_ERROR "add_subdirectory_consumer supports Ninja and Makefile generators, not ${GENERATOR}")
endif()
run(${CMAKE_COMMAND} --build "${WORK_DIR}" --target ${object})
if(NOT EXISTS "${WORK_DIR}/CMakeFiles/consumer.dir/main.cpp.o")
  message(FATAL_ERROR "main.cpp.o was not built")
endif()
file(GLOB_RECURSE torchfit_objects "${WORK_DIR}/torchfit/*.o")
if(torchfit_objects)
  message(FATAL_ERROR "torchfit's own sources were compiled, which this test should not need")
endif()

# Custom steps with wrong signatures stop at torchfit's static_asserts, which say what to write.
execute_process(COMMAND ${CMAKE_COMMAND} --build "${WORK_DIR}" --target ${wrong_object}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "wrong_step.cpp compiled, but its steps have wrong signatures")
endif()
foreach(expected
        "fn must be callable as fn(torchfit::StepContext& step, const Batch& batch)"
        "fn must return void or torchfit::Logs"
        "fn must return the batch's outputs as an at::Tensor")
  string(FIND "${out}${err}" "${expected}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "the compiler's output lacks \"${expected}\":\n${out}${err}")
  endif()
endforeach()
