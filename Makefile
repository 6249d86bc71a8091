# The two commands of the README: `make demo` runs the gateway with its upstream emulator,
# `make test` runs every test. Both install what they need first.

.PHONY: demo test lint build bench-build load

demo:
	@bash .ci/install-deps build
	cargo run --release -- demo

test:
	@bash .ci/install-deps test
	cargo test --all-targets
	cargo run -q -- check-config --offline $(addprefix -c ,$(wildcard config/*.toml))
	bash deploy/check

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

bench-build:
	cargo bench --no-run

load:
	bash benches/load/run.sh
