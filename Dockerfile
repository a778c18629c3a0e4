# streamledger worker and gateway (one image, the command picks the process).

# The worker's native fast path (native/, Rust): built into a wheel with the toolchain of
# the official Rust image, for the Python of the final image.
FROM python:3.12-slim AS native
COPY --from=rust:1-slim-bookworm /usr/local/cargo /usr/local/cargo
COPY --from=rust:1-slim-bookworm /usr/local/rustup /usr/local/rustup
ENV CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup PATH=/usr/local/cargo/bin:$PATH
# It embeds RocksDB, compiled from source (C++), whose bindings bindgen makes with libclang.
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libc6-dev libclang-dev \
    && rm -rf /var/lib/apt/lists/* && pip install --no-cache-dir "maturin>=1.5,<2"
COPY native /native
RUN maturin build --release --manifest-path /native/Cargo.toml --out /wheels

FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ledger ledger
COPY streams streams
COPY api api
COPY streamledger streamledger
COPY schemas schemas
COPY kafka kafka
COPY --from=native /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl -e . && rm -rf /wheels
ENV STREAMLEDGER_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 3068 6066
ENTRYPOINT ["streamledger"]
CMD ["gateway"]
