# The C++ inference runtime (csrc/runtime): the static library mblm_runtime, the mblm-run command
# and its GoogleTest binary. Needs yaml-cpp (MBLM_RUNTIME=AUTO builds it only when found).
if(MBLM_RUNTIME STREQUAL "OFF")
  return()
endif()
if(MBLM_RUNTIME STREQUAL "ON")
  find_package(yaml-cpp CONFIG REQUIRED)
else()
  find_package(yaml-cpp CONFIG QUIET)
  if(NOT yaml-cpp_FOUND)
    message(STATUS "yaml-cpp not found: the C++ runtime (mblm-run) is not built")
    return()
  endif()
endif()
if(TARGET yaml-cpp::yaml-cpp)  # yaml-cpp >= 0.8
  set(MBLM_YAML_CPP yaml-cpp::yaml-cpp)
else()
  set(MBLM_YAML_CPP yaml-cpp)
endif()

file(GLOB MBLM_RUNTIME_SOURCES CONFIGURE_DEPENDS csrc/runtime/*.cpp)
add_library(mblm_runtime STATIC ${MBLM_RUNTIME_SOURCES})
target_include_directories(mblm_runtime PUBLIC csrc/runtime csrc/include)
# -Wno-restrict: GCC 12 false positives on "literal" + std::string (GCC bug 105329)
target_compile_options(mblm_runtime PRIVATE
  -Wall -Wno-unused-parameter $<$<CXX_COMPILER_ID:GNU>:-Wno-restrict>)
# The kernels travel as mblm_ops' object files into every executable that links mblm_runtime:
# inside an archive their op registrations (unreferenced static initialisers) would be dropped.
target_link_libraries(mblm_runtime
  PUBLIC ${TORCH_LIBRARIES} OpenMP::OpenMP_CXX ${MBLM_YAML_CPP}
  INTERFACE $<TARGET_OBJECTS:mblm_ops>)
target_compile_definitions(mblm_runtime PUBLIC
  $<TARGET_PROPERTY:mblm_ops,INTERFACE_COMPILE_DEFINITIONS>)
add_dependencies(mblm_runtime mblm_ops)

# The command needs the model (csrc/runtime/model.cpp) in the library.
file(GLOB MBLM_RUN_SOURCES CONFIGURE_DEPENDS csrc/runtime/cli/*.cpp)
if(EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/runtime/model.cpp" AND MBLM_RUN_SOURCES)
  add_executable(mblm-run ${MBLM_RUN_SOURCES})
  target_link_libraries(mblm-run PRIVATE mblm_runtime)
  # Installed, it finds torch's libraries where the build found them; from a wheel also in the
  # environment's site-packages, relative to the scripts directory it is installed to.
  get_filename_component(_torch_lib_dir "${TORCH_LIBRARY}" DIRECTORY)  # set by TorchConfig
  if(SKBUILD)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
              "import os, sysconfig as s; print(os.path.relpath(s.get_path('platlib'), s.get_path('scripts')))"
      OUTPUT_VARIABLE _site_from_bin OUTPUT_STRIP_TRAILING_WHITESPACE)
    set_target_properties(mblm-run PROPERTIES
      INSTALL_RPATH "$ORIGIN/${_site_from_bin}/torch/lib;${_torch_lib_dir}")
    install(TARGETS mblm-run RUNTIME DESTINATION "${SKBUILD_SCRIPTS_DIR}")
  else()
    include(GNUInstallDirs)
    set_target_properties(mblm-run PROPERTIES INSTALL_RPATH "${_torch_lib_dir}")
    install(TARGETS mblm-run RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}")
  endif()
endif()

if(MBLM_BUILD_TESTS)
  enable_testing()
  find_package(GTest REQUIRED)
  file(GLOB MBLM_RUNTIME_TESTS CONFIGURE_DEPENDS tests/cpp/runtime/*.cpp)
  add_executable(mblm_runtime_tests ${MBLM_RUNTIME_TESTS})
  target_link_libraries(mblm_runtime_tests PRIVATE mblm_runtime GTest::gtest GTest::gtest_main)
  target_compile_definitions(mblm_runtime_tests PRIVATE
    MBLM_SOURCE_DIR="${CMAKE_CURRENT_SOURCE_DIR}")
  include(GoogleTest)
  gtest_discover_tests(mblm_runtime_tests DISCOVERY_TIMEOUT 60)
endif()
