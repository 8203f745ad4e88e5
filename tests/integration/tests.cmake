# Integration tests: pytest (Debian's python3-pytest and python3-websockets) against the real
# binary, one ctest test per test_*.py file so that ctest -j runs them in parallel. Included from
# tests/CMakeLists.txt, so CMAKE_CURRENT_SOURCE_DIR is tests/. Each build directory tests its own
# binary (HERALD_BIN), and keeps pytest's temporary files in its own tree.
set(HERALD_INTEGRATION_PYTHON /usr/bin/python3)
file(GLOB HERALD_INTEGRATION_FILES CONFIGURE_DEPENDS
     ${CMAKE_CURRENT_SOURCE_DIR}/integration/test_*.py)
list(SORT HERALD_INTEGRATION_FILES)
foreach(file ${HERALD_INTEGRATION_FILES})
  get_filename_component(stem ${file} NAME_WE)
  string(REGEX REPLACE "^test_" "" name ${stem})
  add_test(NAME integration_${name}
    COMMAND ${HERALD_INTEGRATION_PYTHON} -m pytest -q -p no:cacheprovider
            --basetemp=${CMAKE_CURRENT_BINARY_DIR}/pytest-${name} ${file}
    WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/integration)
  set_tests_properties(integration_${name} PROPERTIES
    ENVIRONMENT "HERALD_BIN=$<TARGET_FILE:herald>;PYTHONDONTWRITEBYTECODE=1"
    TIMEOUT 300
    LABELS integration)
endforeach()
