"""Every bound of the system, in one place, with the asserts that relate them.

A bound that is not written down is a bound discovered in production.
"""

# A transaction: postings and metadata.
postings_per_transaction_max = 1_000
metadata_entries_max = 1_000
metadata_key_bytes_max = 1_024
metadata_value_bytes_max = 64 * 1024
reference_bytes_max = 1_024
address_bytes_max = 1_024
idempotency_key_bytes_max = 1_024

# Numscript: source size and the number of interpreter steps before a script is stopped.
numscript_source_bytes_max = 256 * 1024
numscript_steps_max = 100_000

# Amounts are arbitrary-precision, but not unbounded: 10^200 minor units is far beyond any
# real money and keeps a hostile request from costing unbounded CPU in big-int arithmetic.
amount_digits_max = 200

# The wire: requests per batched record and bytes per record on ledger.requests.
requests_per_record_max = 2_000
record_bytes_max = 900 * 1024  # below Kafka's default 1 MiB message.max.bytes

# The log: the largest outcome record the worker publishes (ledger.committed, ledger.rejected,
# ledger.replies, whose topics and producers are configured for it). A log entry carries
# its transaction's postings and every account's volumes twice: a request of 455 KB
# (1,000 postings to ~400-byte addresses) logs ~1.5 MB, above Kafka's default 1 MB record.
# The largest requests (record_bytes_max; a script writing 1,000 postings between 1 KB
# addresses, with 200-digit amounts) stay well under this.
log_record_bytes_max = 16 * 1024 * 1024

# The worker: requests applied per Kafka transaction.
batch_requests_max = 4_000

# The gateway.
http_body_bytes_max = 4 * 1024 * 1024
page_size_default = 15
page_size_max = 1_000
bulk_elements_max = 100

assert postings_per_transaction_max <= requests_per_record_max * 10
assert requests_per_record_max <= batch_requests_max
assert page_size_default <= page_size_max
assert numscript_source_bytes_max < record_bytes_max
assert 4 * record_bytes_max < log_record_bytes_max
