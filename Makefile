# The two commands of the README: `make demo` runs the gateway with its upstream emulator
# (`liveness-gateway-dev demo`), `make test` runs every test. Both install what they need first.

.PHONY: demo test lint build bench-build load load-fleet load-tls load-tokens load-traces load-face chaos soak

demo:
	@bash .ci/install-deps build
	cargo run --release -p liveness-gateway-dev -- demo

test:
	@bash .ci/install-deps test
	cargo test --workspace --all-targets
	cargo run -q -- check-config --offline $(addprefix -c ,$(wildcard config/*.toml))
	bash deploy/check

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench-build:
	cargo bench --no-run

load:
	bash benches/load/run.sh

# The gateway on a shared Redis beside the local store, in one run (benches/README.md).
load-fleet:
	bash benches/load/fleet.sh

# The gateway terminating TLS (HTTP/1.1 and HTTP/2) against nginx terminating TLS, and new
# handshakes per second, in one run (benches/README.md).
load-tls:
	bash benches/load/tls.sh

# Tenant key, one reused app token, and a new app token per request, in one run (benches/README.md).
load-tokens:
	bash benches/load/tokens.sh

load-traces:
	bash benches/load/traces.sh

load-face:
	bash benches/load/face.sh

# The full chaos suite (2 minutes, 200 clients, every fault, a hostile crowd; then an upgrade and
# a SIGTERM under load) and the 10-minute soak. `make test` runs short versions of both.
chaos:
	@bash .ci/install-deps test
	CHAOS_SECS=120 CHAOS_CLIENTS=200 cargo test --release --test chaos -- --nocapture --test-threads 1 chaos upgrade

soak:
	@bash .ci/install-deps test
	SOAK_SECS=600 SOAK_CLIENTS=50 cargo test --release --test chaos -- --nocapture soak
