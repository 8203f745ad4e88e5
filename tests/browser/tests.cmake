# Browser tests: the demo pages in web/ loaded in Debian's Chromium (/usr/bin/chromium), driven by
# playwright-core from tests/browser/node_modules (tools/install-deps.sh test runs npm ci there).
# One ctest per *.test.mjs file, run by Node's test runner, so that ctest -j runs them in parallel.
# Each test starts its own herald (HERALD_BIN: this build tree's binary, so the sanitizer build
# runs them against its own) and saves screenshots into <build>/tests/browser-artifacts/.
# Included from tests/CMakeLists.txt, so CMAKE_CURRENT_SOURCE_DIR is tests/.
find_program(HERALD_NODE node)
if(NOT HERALD_NODE)
  message(STATUS "node not found: browser tests not registered (tools/install-deps.sh test installs it)")
else()
  file(GLOB HERALD_BROWSER_FILES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/browser/*.test.mjs)
  list(SORT HERALD_BROWSER_FILES)
  foreach(file ${HERALD_BROWSER_FILES})
    get_filename_component(name ${file} NAME)
    string(REGEX REPLACE "\\.test\\.mjs$" "" name ${name})
    add_test(NAME browser_${name}
      COMMAND ${HERALD_NODE} --test --test-reporter=spec ${file}
      WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/browser)
    set_tests_properties(browser_${name} PROPERTIES
      ENVIRONMENT "HERALD_BIN=$<TARGET_FILE:herald>;HERALD_BROWSER_ARTIFACTS=${CMAKE_BINARY_DIR}/tests/browser-artifacts"
      TIMEOUT 180
      LABELS browser)
  endforeach()
endif()
