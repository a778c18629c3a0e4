# streamledger worker and gateway (one image, the command picks the process).
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ledger ledger
COPY streams streams
COPY api api
COPY streamledger streamledger
COPY schemas schemas
COPY kafka kafka
RUN pip install --no-cache-dir -e .
ENV STREAMLEDGER_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 3068 6066
ENTRYPOINT ["streamledger"]
CMD ["gateway"]
