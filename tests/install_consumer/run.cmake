# SPDX-License-Identifier: Apache-2.0
# cmake -P script: install pqkv into WORK_DIR/prefix, then configure, build and
# run the consumer project against that prefix alone.
file(REMOVE_RECURSE "${WORK_DIR}")
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    list(JOIN ARGV " " cmd)
    message(FATAL_ERROR "install_consumer: '${cmd}' failed (${rc})")
  endif()
endfunction()
run(${CMAKE_COMMAND} --install "${PQKV_BINARY_DIR}" --prefix "${WORK_DIR}/prefix")
run(${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/build" -DCMAKE_BUILD_TYPE=Release
    "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix" "-DEigen3_DIR=${Eigen3_DIR}" "-Dlibcudacxx_DIR=${libcudacxx_DIR}")
run(${CMAKE_COMMAND} --build "${WORK_DIR}/build")
run("${WORK_DIR}/build/consumer")
