# Recipes for building, running and testing the host and its components.
set shell := ["bash", "-euo", "pipefail", "-c"]

# The services under components/ (`just new NAME` adds one): Rust crates, and Python
# (`app.py`, componentize-py) and JavaScript (`app.js`, componentize-js) services.
components := `find components -mindepth 2 -maxdepth 2 -name Cargo.toml | cut -d/ -f2 | grep -vx sdk | sort | tr '\n' ' '`
python_components := `find components -mindepth 2 -maxdepth 2 -name app.py | cut -d/ -f2 | sort | tr '\n' ' '`
js_components := `find components -mindepth 2 -maxdepth 2 -name app.js | cut -d/ -f2 | sort | tr '\n' ' '`
out := env_var_or_default("COMPONENTS_DIR", "build/components")
fixtures := "build/fixtures"
# Where `just build` installs the Python and JavaScript toolchains, the first time (the
# environment may point elsewhere, e.g. at one shared by several checkouts).
python_toolchain := env_var_or_default("PYTHON_TOOLCHAIN", "build/toolchains/python")
js_toolchain := env_var_or_default("JS_TOOLCHAIN", "build/toolchains/js")
# playwright-core for the console's browser test (it drives Debian's chromium).
browser_toolchain := env_var_or_default("BROWSER_TOOLCHAIN", "build/toolchains/browser")

# Build the components and the host (release).
build: build-components
    cargo build --release -p host

# Build the components and put them in the components dir (atomically: temp file + rename).
build-components: _target
    cargo build --profile component --target wasm32-wasip2 {{ prepend("-p ", components) }}
    mkdir -p {{out}}
    for c in {{components}}; do just _install $c; done
    for c in {{python_components}}; do just _python $c {{out}}/$c.wasm; done
    for c in {{js_components}}; do just _js $c {{out}}/$c.wasm; done

# Rebuild one component (gateway, user, product, order, notification, reviews, ratings, or
# one of yours), whatever its language.
build-component name: _target
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -f components/{{name}}/app.py ]; then just _python {{name}} {{out}}/{{name}}.wasm
    elif [ -f components/{{name}}/app.js ]; then just _js {{name}} {{out}}/{{name}}.wasm
    else cargo build --profile component --target wasm32-wasip2 -p {{name}} && just _install {{name}}
    fi

# A Python service (the app.py in `dir`): componentize-py, with components/sdk/python (the
# `microsvc` module) and `extra` (a directory, e.g. a test build's `build_tag.py`) on its
# module path. Its world follows what app.py defines: `HttpHandler` (`http-service`),
# `Handler` (`subscriber`), or both (`runtime`). Skipped when `dest` is newer than everything
# it is built from.
_python name dest extra="" dir=("components/" + name): _python_toolchain
    #!/usr/bin/env bash
    set -euo pipefail
    sources="{{dir}} components/sdk/python wit/platform.wit {{extra}}"
    if [ -f "{{dest}}" ] && [ -z "$(find $sources -newer "{{dest}}" -type f | head -1)" ]; then exit 0; fi
    world=http-service
    if grep -q '^class Handler' {{dir}}/app.py; then
        world=subscriber
        if grep -q '^class HttpHandler' {{dir}}/app.py; then world=runtime; fi
    fi
    mkdir -p "$(dirname "{{dest}}")"
    tmp="$(dirname "{{dest}}")/.$(basename "{{dest}}").tmp"
    {{python_toolchain}}/bin/componentize-py -d wit -w microsvc:platform/$world componentize app \
        -p {{dir}} -p components/sdk/python {{ if extra == "" { "" } else { "-p " + extra } }} -o "$tmp" >/dev/null
    mv "$tmp" "{{dest}}"

# A JavaScript service: componentize-js on a copy of components/NAME beside `microsvc.js`
# (components/sdk/js). Its world follows what app.js exports: `httpHandler` (`http-service`),
# `handler` (`subscriber`), or both (`runtime`). Skipped when `dest` is newer than everything
# it is built from.
_js name dest: _js_toolchain
    #!/usr/bin/env bash
    set -euo pipefail
    sources="components/{{name}} components/sdk/js/microsvc.js wit/platform.wit"
    if [ -f "{{dest}}" ] && [ -z "$(find $sources -newer "{{dest}}" -type f | head -1)" ]; then exit 0; fi
    world=http-service
    if grep -qE '^export const handler\b' components/{{name}}/app.js; then
        world=subscriber
        if grep -qE '^export const httpHandler\b' components/{{name}}/app.js; then world=runtime; fi
    fi
    stage=build/js/{{name}}
    rm -rf "$stage" && mkdir -p "$stage"
    cp components/{{name}}/*.js components/sdk/js/microsvc.js "$stage/"
    mkdir -p "$(dirname "{{dest}}")"
    tmp="$(dirname "{{dest}}")/.$(basename "{{dest}}").tmp"
    {{js_toolchain}}/node_modules/.bin/componentize-js "$stage/app.js" --wit wit --world-name $world \
        --disable http fetch-event -o "$tmp" >/dev/null
    mv "$tmp" "{{dest}}"

# componentize-py in a virtualenv, installed from PyPI once (again when the pin changes).
_python_toolchain:
    #!/usr/bin/env bash
    set -euo pipefail
    pins=components/sdk/python/requirements.txt
    cmp -s $pins {{python_toolchain}}/requirements.txt && exit 0
    python3 -m venv {{python_toolchain}}
    {{python_toolchain}}/bin/pip install --quiet --disable-pip-version-check -r $pins
    cp $pins {{python_toolchain}}/requirements.txt

# componentize-js from npm with the committed lockfile, once (again when the lockfile changes).
_js_toolchain:
    #!/usr/bin/env bash
    set -euo pipefail
    lock=components/sdk/js/package-lock.json
    cmp -s $lock {{js_toolchain}}/package-lock.json && exit 0
    rm -rf {{js_toolchain}} && mkdir -p {{js_toolchain}}
    cp components/sdk/js/package.json $lock {{js_toolchain}}/
    cd {{js_toolchain}} && npm ci --no-audit --no-fund --loglevel=error

# Scaffold a service: components/NAME from templates/ (Rust: one lib.rs with a `route`, and a
# workspace member; `--lang python`: one app.py; `--lang js`: one app.js), and a manifest
# entry on the next free port. Then `just build-component NAME`.
new name *flags:
    #!/usr/bin/env bash
    set -euo pipefail
    lang=rust
    set -- {{flags}}
    while [ $# -gt 0 ]; do
        case "$1" in
            --lang) lang="${2:-}"; shift 2 || shift ;;
            --lang=*) lang="${1#--lang=}"; shift ;;
            *) echo "unknown option $1 (use --lang rust|python|js)" >&2; exit 2 ;;
        esac
    done
    [[ "{{name}}" =~ ^[a-z][a-z0-9-]*$ ]] || { echo "a service name is a-z, 0-9 and -, starting with a letter" >&2; exit 2; }
    [ ! -e "components/{{name}}" ] || { echo "components/{{name}} exists" >&2; exit 2; }
    ! grep -q '^\[service\.{{name}}\]' services.toml || { echo "services.toml already has [service.{{name}}]" >&2; exit 2; }
    case "$lang" in
        rust)
            cp -r templates/service "components/{{name}}"
            sed -i "s/NAME/{{name}}/g" "components/{{name}}/Cargo.toml" "components/{{name}}/src/lib.rs"
            sed -i 's|^members = \["host", |members = ["host", "components/{{name}}", |' Cargo.toml
            source=src/lib.rs ;;
        python) mkdir -p "components/{{name}}" && sed "s/NAME/{{name}}/g" templates/python/app.py > "components/{{name}}/app.py"; source=app.py ;;
        js) mkdir -p "components/{{name}}" && sed "s/NAME/{{name}}/g" templates/js/app.js > "components/{{name}}/app.js"; source=app.js ;;
        *) echo "--lang is rust, python or js, not \"$lang\"" >&2; exit 2 ;;
    esac
    port=$(( $(grep -oE '^port = [0-9]+' services.toml | awk '{print $3}' | sort -n | tail -1) + 1 ))
    printf '\n[service.%s]\ncomponent = "%s.wasm"\nport = %s\n' "{{name}}" "{{name}}" "$port" >> services.toml
    echo "components/{{name}}: edit $source; services.toml: [service.{{name}}] on port $port"
    echo "next: just build-component {{name}}; a running host starts it then: curl localhost:$port/"

_install name:
    mkdir -p {{out}}
    cp ${CARGO_TARGET_DIR:-target}/wasm32-wasip2/component/{{ replace(name, "-", "_") }}.wasm {{out}}/.{{name}}.wasm.tmp
    mv {{out}}/.{{name}}.wasm.tmp {{out}}/{{name}}.wasm

# Test fixtures: tagged builds of user/order/misbehave and of the Python reviews (x-build:
# a|b), components to refuse, a misbehaving one, the trivial `hello` (sdk, and wasi:http 0.2
# alone) used by benchmarks, `hello-p3` (wasi:http 0.3, no sdk), `spin-hello` (spin-sdk 7),
# `auth-p3` (a WASI 0.3 middleware), `kv-counter` (wasi:keyvalue, wasi:config and
# wasi:messaging alone) built on Spin's versions and wasmCloud's, `spin-kv` (spin-sdk 7's
# key-value and variables), `wasmcloud-kv` (wasmcloud:keyvalue) and `py-consumer` (Python,
# a message handler without HTTP).
build-fixtures: _target
    mkdir -p {{fixtures}}
    for tag in a b; do \
        COMPONENT_BUILD_TAG=$tag cargo build --profile component --target wasm32-wasip2 -p user -p order -p fixture-misbehave; \
        for c in user order; do cp target/wasm32-wasip2/component/$c.wasm {{fixtures}}/$c-$tag.wasm; done; \
        cp target/wasm32-wasip2/component/fixture_misbehave.wasm {{fixtures}}/misbehave-$tag.wasm; \
    done
    cargo build --profile component --target wasm32-wasip2 -p fixture-no-http -p fixture-bad-import -p fixture-misbehave -p fixture-hello -p fixture-hello-wasi -p fixture-hello-p3 -p fixture-spin-hello -p fixture-auth-p3 -p fixture-spin-kv -p fixture-wasmcloud-kv
    cp target/wasm32-wasip2/component/fixture_wasmcloud_kv.wasm {{fixtures}}/wasmcloud-kv.wasm
    cp target/wasm32-wasip2/component/fixture_spin_kv.wasm {{fixtures}}/spin-kv.wasm
    cp target/wasm32-wasip2/component/fixture_hello_p3.wasm {{fixtures}}/hello-p3.wasm
    cp target/wasm32-wasip2/component/fixture_auth_p3.wasm {{fixtures}}/auth-p3.wasm
    cp target/wasm32-wasip2/component/fixture_spin_hello.wasm {{fixtures}}/spin-hello.wasm
    cp target/wasm32-wasip2/component/fixture_hello.wasm {{fixtures}}/hello.wasm
    cp target/wasm32-wasip2/component/fixture_hello_wasi.wasm {{fixtures}}/hello-wasi.wasm
    cp target/wasm32-wasip2/component/fixture_misbehave.wasm {{fixtures}}/misbehave.wasm
    cp target/wasm32-wasip2/component/fixture_no_http.wasm {{fixtures}}/no-http.wasm
    cp target/wasm32-wasip2/component/fixture_bad_import.wasm {{fixtures}}/bad-import.wasm
    cargo build --profile component --target wasm32-wasip2 -p fixture-kv-counter
    cp target/wasm32-wasip2/component/fixture_kv_counter.wasm {{fixtures}}/kv-counter.wasm
    cargo build --profile component --target wasm32-wasip2 -p fixture-kv-counter --features draft
    cp target/wasm32-wasip2/component/fixture_kv_counter.wasm {{fixtures}}/kv-counter-draft.wasm
    for tag in a b; do \
        mkdir -p build/tags/$tag; \
        grep -qs "\"$tag\"" build/tags/$tag/build_tag.py || echo "TAG = \"$tag\"" > build/tags/$tag/build_tag.py; \
        just _python reviews {{fixtures}}/reviews-$tag.wasm build/tags/$tag; \
    done
    just _python py-consumer {{fixtures}}/py-consumer.wasm "" components/fixtures/py-consumer

# Build, then run the host on :3000-:3005 (admin on 127.0.0.1:3999). Extra flags go to the host.
run *flags: build
    ./target/release/host {{flags}}

# Run the host against Kafka on localhost:9092 (start one with `just kafka-up`).
run-kafka *flags: build
    KAFKA_BROKERS=${KAFKA_BROKERS:-127.0.0.1:9092} ./target/release/host {{flags}}

# Start a single-node Kafka (KRaft) in Docker on localhost:9092.
kafka-up:
    docker compose up -d kafka

# Stop what docker-compose.yml started.
kafka-down:
    docker compose --profile full down

# Build everything, then run all tests (Kafka tests start their own tansu broker).
test: build build-fixtures _tansu _postgres _browser
    BROWSER_TOOLCHAIN="$(realpath {{browser_toolchain}})" cargo test --release -p host -p sdk {{ prepend("-p ", components) }}

# Benchmarks (not tests): start-up, event latency, hot-path micro-benchmarks, and wrk side by
# side with the Node seed and `wasmtime serve`. Rewrites BENCHMARKS.md.
bench: build build-fixtures _tansu _wasmtime _postgres
    #!/usr/bin/env bash
    set -euo pipefail
    table=$(cargo bench -p host --bench e2e)
    rm -rf target/criterion
    cargo bench -p host --bench hot_paths -- --noplot >&2
    micro=$(python3 host/benches/criterion_table.py target/criterion)
    compare=$(host/benches/compare.sh)
    trivial=$(host/benches/trivial.sh)
    scale=$(host/benches/scale.sh)
    languages=$(host/benches/languages.sh)
    {
        echo "# Benchmarks"
        echo
        echo "Produced by \`just bench\` on $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')),"
        echo "commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d). One run; medians and"
        echo "percentiles of that run. Figures drift between machines: compare within one run."
        echo
        echo "## Side by side with the Node seed (\`host/benches/compare.sh\`)"
        echo
        echo "Same machine, same ports, one after the other, each against a fresh tansu broker."
        echo
        echo "$compare"
        echo
        echo "## Instances: fresh, reused one at a time, and shared by WASI 0.3 requests (\`host/benches/trivial.sh\`)"
        echo
        echo "This host alone, wrk -t1 -c32 -d8s; cells are req/s (p50 / p99)."
        echo
        echo "$trivial"
        echo
        echo "## Services in Python and JavaScript beside Rust (\`host/benches/languages.sh\`)"
        echo
        echo "Each service alone for start-up; then the repository's manifest, wrk -t1 -c32 -d8s; cells are req/s (p50 / p99)."
        echo
        echo "$languages"
        echo
        echo "## State on PostgreSQL, one and two hosts (\`host/benches/scale.sh\`)"
        echo
        echo "$scale"
        echo
        echo "## Start-up and event latency (\`cargo bench -p host --bench e2e\`)"
        echo
        echo "$table"
        echo
        echo "## Hot paths (\`cargo bench -p host --bench hot_paths\`, criterion, in process)"
        echo
        echo "$micro"
    } > BENCHMARKS.md
    cat BENCHMARKS.md

_wasmtime:
    command -v wasmtime >/dev/null || cargo install wasmtime-cli --version 48.0.8 --locked || echo "no wasmtime: its column stays empty" >&2

# Formatting and lints for the host and the components.
lint: _target
    rustup component add rustfmt clippy
    cargo fmt --all --check
    cargo clippy --release -p host --all-targets -- -D warnings
    cargo clippy --release --target wasm32-wasip2 -p sdk {{ prepend("-p ", components) }} -p fixture-no-http -p fixture-bad-import -p fixture-misbehave -p fixture-hello -p fixture-hello-wasi -p fixture-hello-p3 -p fixture-spin-hello -p fixture-auth-p3 -p fixture-kv-counter -p fixture-spin-kv -p fixture-wasmcloud-kv -- -D warnings

# The components' target. rustup may be set not to install it by itself
# (RUSTUP_AUTO_INSTALL=0); adding an installed target is a quick no-op.
_target:
    rustup target add wasm32-wasip2

_tansu:
    command -v tansu >/dev/null || cargo install tansu --locked --features dynostore

# The console's browser test: Debian's chromium, and playwright-core from npm with the
# committed lockfile (it downloads no browser), once (again when the lockfile changes).
_browser:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v chromium >/dev/null; then
        sudo=$(command -v sudo || true)
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
    fi
    lock=host/tests/console/package-lock.json
    cmp -s $lock {{browser_toolchain}}/package-lock.json && exit 0
    rm -rf {{browser_toolchain}} && mkdir -p {{browser_toolchain}}
    cp host/tests/console/package.json $lock {{browser_toolchain}}/
    cd {{browser_toolchain}} && npm ci --no-audit --no-fund --loglevel=error

# PostgreSQL's server binaries, for the tests that start their own server (Debian's package).
# `pg_config` alone may come from libpq-dev, without the server: look for `initdb`.
_postgres:
    test -x "$(pg_config --bindir 2>/dev/null)/initdb" || { $(command -v sudo || true) env DEBIAN_FRONTEND=noninteractive apt-get update && $(command -v sudo || true) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }

# Rebuild components when their source (Rust, Python or JavaScript) or the WIT changes; a
# running host swaps them in.
watch:
    #!/usr/bin/env bash
    set -uo pipefail
    stamp=$(mktemp); trap 'rm -f $stamp' EXIT
    echo "watching components/ and wit/ (Ctrl-C to stop)"
    while sleep 1; do
        if [ -n "$(find components wit -newer "$stamp" \( -name '*.rs' -o -name '*.wit' -o -name Cargo.toml -o -name '*.py' -o -name '*.js' \) | head -1)" ]; then
            touch "$stamp"
            just build-components || echo "build failed; the host keeps the running versions"
        fi
    done

# Remove build outputs and local data.
clean:
    cargo clean
    rm -rf build data
