# The C++ inference runtime (csrc/runtime) in two static libraries:
# - mblm_runtime_core: the model, its stages, the cached decoder, sampling and safetensors
#   weights. It needs only torch, so it is built whenever MBLM_RUNTIME is not OFF, and the Python
#   module links it (mblm._C.RuntimeModel: the decoder of MBLM.generate, no yaml-cpp needed);
# - mblm_runtime: the core plus the YAML config reader and mblm-run's options. Needs yaml-cpp
#   (MBLM_RUNTIME=AUTO builds it, mblm-run and their tests only when yaml-cpp is found).
if(MBLM_RUNTIME STREQUAL "OFF")
  return()
endif()

file(GLOB MBLM_RUNTIME_CORE_SOURCES CONFIGURE_DEPENDS csrc/runtime/*.cpp)
set(_runtime_yaml_part "/(config|yaml_value|run_options)\\.cpp$")
list(FILTER MBLM_RUNTIME_CORE_SOURCES EXCLUDE REGEX "${_runtime_yaml_part}")
add_library(mblm_runtime_core STATIC ${MBLM_RUNTIME_CORE_SOURCES})
# PIC and hidden: it is linked into the Python module as well as into executables.
set_target_properties(mblm_runtime_core PROPERTIES
  POSITION_INDEPENDENT_CODE ON CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)
target_include_directories(mblm_runtime_core PUBLIC csrc/runtime csrc/include)
# -Wno-restrict: GCC 12 false positives on "literal" + std::string (GCC bug 105329)
set(_runtime_warnings -Wall -Wno-unused-parameter $<$<CXX_COMPILER_ID:GNU>:-Wno-restrict>)
target_compile_options(mblm_runtime_core PRIVATE ${_runtime_warnings})
# The kernels it calls are mblm_ops' objects, which every binary must link exactly once (their
# op registrations run at load time): _C links them itself, executables through mblm_runtime.
target_link_libraries(mblm_runtime_core PUBLIC ${TORCH_LIBRARIES} OpenMP::OpenMP_CXX)
target_compile_definitions(mblm_runtime_core PUBLIC
  $<TARGET_PROPERTY:mblm_ops,INTERFACE_COMPILE_DEFINITIONS>)

if(MBLM_RUNTIME STREQUAL "ON")
  find_package(yaml-cpp CONFIG REQUIRED)
else()
  find_package(yaml-cpp CONFIG QUIET)
  if(NOT yaml-cpp_FOUND)
    message(STATUS "yaml-cpp not found: mblm-run is not built (the Python module's runtime is)")
    return()
  endif()
endif()
if(TARGET yaml-cpp::yaml-cpp)  # yaml-cpp >= 0.8
  set(MBLM_YAML_CPP yaml-cpp::yaml-cpp)
else()
  set(MBLM_YAML_CPP yaml-cpp)
endif()

file(GLOB MBLM_RUNTIME_SOURCES CONFIGURE_DEPENDS csrc/runtime/*.cpp)
list(FILTER MBLM_RUNTIME_SOURCES INCLUDE REGEX "${_runtime_yaml_part}")
add_library(mblm_runtime STATIC ${MBLM_RUNTIME_SOURCES})
target_compile_options(mblm_runtime PRIVATE ${_runtime_warnings})
# The kernels travel as mblm_ops' object files into every executable that links mblm_runtime:
# inside an archive their op registrations (unreferenced static initialisers) would be dropped.
target_link_libraries(mblm_runtime
  PUBLIC mblm_runtime_core ${MBLM_YAML_CPP}
  INTERFACE $<TARGET_OBJECTS:mblm_ops>)
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
