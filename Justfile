# Recipes for building, running and testing the host and its components.
set shell := ["bash", "-euo", "pipefail", "-c"]

components := "gateway user product order"
out := env_var_or_default("COMPONENTS_DIR", "build/components")

# Build the four components and the host (release).
build: build-components
    cargo build --release -p host

# Build the four components and put them in the components dir (atomically: temp file + rename).
build-components:
    cargo build --release --target wasm32-wasip2 {{ prepend("-p ", components) }}
    mkdir -p {{out}}
    for c in {{components}}; do just _install $c; done

# Rebuild one component (gateway, user, product or order).
build-component name:
    cargo build --release --target wasm32-wasip2 -p {{name}}
    just _install {{name}}

_install name:
    mkdir -p {{out}}
    cp target/wasm32-wasip2/release/{{name}}.wasm {{out}}/.{{name}}.wasm.tmp
    mv {{out}}/.{{name}}.wasm.tmp {{out}}/{{name}}.wasm

# Run the host on :3000-:3003 (admin on 127.0.0.1:3999). Extra flags go to the host.
run *flags:
    ./target/release/host {{flags}}

# Build everything, then run every test (unit + integration against the real host).
test: build
    cargo test --release -p host -p sdk -p gateway -p user -p product -p order

# Formatting and lints for the host and the components.
lint:
    cargo fmt --all --check
    cargo clippy --release -p host --all-targets -- -D warnings
    cargo clippy --release --target wasm32-wasip2 -p sdk {{ prepend("-p ", components) }} -- -D warnings

# Remove build outputs and local data.
clean:
    cargo clean
    rm -rf build data
