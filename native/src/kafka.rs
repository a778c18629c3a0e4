//! A round's records handed to librdkafka from here, not one Python `produce()` call each.
//!
//! The worker's transactions stay confluent-kafka's (`streams/writer.py`: begin, flush,
//! offsets, commit, abort, every error path); only the records go in from Rust, into the
//! same producer: its librdkafka handle is read from the confluent-kafka `Producer` object,
//! and `rd_kafka_produceva` is looked up in the librdkafka the process already loaded for
//! confluent-kafka (never a second copy). Per record this is what confluent-kafka's own
//! `produce()` does (`rd_kafka_producev` with `RD_KAFKA_MSG_F_COPY`, the topic by name, an
//! explicit partition, the key, the value, one header) without building a Python object
//! per record or parsing a call's arguments.
//!
//! These records carry no per-message opaque, so confluent-kafka's delivery-report callback
//! skips them (`dr_msg_cb` returns at once for a message without its state). The last record
//! of each (topic, partition) of a round goes through `Producer.produce` with a delivery
//! callback, as before: its offset is what the store records (`Writer.commit`).

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use libloading::os::unix::{Library, Symbol};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

// rdkafka.h (stable since librdkafka 1.6): rd_kafka_vtype_t and rd_kafka_vu_t.
const VTYPE_TOPIC: c_int = 1;
const VTYPE_PARTITION: c_int = 3;
const VTYPE_VALUE: c_int = 4;
const VTYPE_KEY: c_int = 5;
const VTYPE_MSGFLAGS: c_int = 7;
const VTYPE_HEADER: c_int = 9;
const MSG_F_COPY: c_int = 0x2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Header {
    name: *const c_char,
    value: *const c_void,
    size: isize,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Mem {
    data: *const c_void,
    size: usize,
}

#[repr(C)]
union VuValue {
    cstr: *const c_char,
    i: c_int,
    i32: i32,
    mem: Mem,
    header: Header,
    _pad: [u8; 64],
}

#[repr(C)]
struct Vu {
    vtype: c_int,
    u: VuValue,
}

type Produceva = unsafe extern "C" fn(*mut c_void, *const Vu, usize) -> *mut c_void;
type Opaque = unsafe extern "C" fn(*const c_void) -> *mut c_void;
type ErrorCode = unsafe extern "C" fn(*const c_void) -> c_int;
type ErrorString = unsafe extern "C" fn(*const c_void) -> *const c_char;
type ErrorDestroy = unsafe extern "C" fn(*mut c_void);

/// The librdkafka confluent-kafka loaded, and the calls the worker makes into it.
#[pyclass(module = "streamledger_native")]
pub struct Kafka {
    produceva: Symbol<Produceva>,
    opaque: Symbol<Opaque>,
    error_code: Symbol<ErrorCode>,
    error_string: Symbol<ErrorString>,
    error_destroy: Symbol<ErrorDestroy>,
    _library: Library,
    /// `confluent_kafka.Producer`: only its objects are read as one.
    producer_type: PyObject,
}

fn unavailable(why: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(format!("producing from the native module is unavailable: {why}"))
}

/// The path of the librdkafka mapped into this process (confluent-kafka's).
fn loaded_librdkafka() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.rsplit('/').next().is_some_and(|name| name.starts_with("librdkafka")))
        .map(str::to_owned)
}

/// A record to produce: its topic, key, value and `request_id` header.
pub struct Record<'a> {
    pub topic: &'a CStr,
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub request_id: &'a [u8],
}

impl Kafka {
    /// The librdkafka handle of a confluent-kafka `Producer`: the first field of its C
    /// struct (`Handle`, after the object header), checked against the opaque
    /// confluent-kafka gives librdkafka, which is the object itself.
    fn handle(&self, producer: &Bound<PyAny>) -> PyResult<*mut c_void> {
        if !producer.is_instance(self.producer_type.bind(producer.py()))? {
            return Err(unavailable("not a confluent_kafka.Producer"));
        }
        let object = producer.as_ptr() as *const u8;
        let rk = unsafe { *(object.add(std::mem::size_of::<pyo3::ffi::PyObject>()) as *const *mut c_void) };
        if rk.is_null() || (rk as usize) % std::mem::align_of::<usize>() != 0 {
            return Err(unavailable("not a live confluent-kafka Producer"));
        }
        if unsafe { (self.opaque)(rk) } as *const u8 != object {
            return Err(unavailable("not a confluent-kafka Producer of the expected layout"));
        }
        Ok(rk)
    }

    /// Produce the records `record` gives for the indexes of `range` (None: skip it), in
    /// order, into `producer`'s given partition. -> where it stopped (`range.end` when
    /// everything was handed over) and the error that stopped it (librdkafka's code and
    /// text): `QUEUE_FULL` means poll and go on from there.
    pub fn produce<'a>(
        &self, producer: &Bound<PyAny>, partition: i32, range: std::ops::Range<usize>,
        record: impl Fn(usize) -> Option<Record<'a>>,
    ) -> PyResult<(usize, Option<(i32, String)>)> {
        let rk = self.handle(producer)?;
        let mut vus: [Vu; 6] = [
            Vu { vtype: VTYPE_TOPIC, u: VuValue { cstr: std::ptr::null() } },
            Vu { vtype: VTYPE_PARTITION, u: VuValue { i32: partition } },
            Vu { vtype: VTYPE_KEY, u: VuValue { mem: Mem { data: std::ptr::null(), size: 0 } } },
            Vu { vtype: VTYPE_VALUE, u: VuValue { mem: Mem { data: std::ptr::null(), size: 0 } } },
            Vu { vtype: VTYPE_MSGFLAGS, u: VuValue { i: MSG_F_COPY } },
            Vu { vtype: VTYPE_HEADER, u: VuValue { header: Header { name: c"request_id".as_ptr(), value: std::ptr::null(), size: 0 } } },
        ];
        for at in range.clone() {
            let Some(record) = record(at) else { continue };
            vus[0].u.cstr = record.topic.as_ptr();
            vus[2].u.mem = Mem { data: record.key.as_ptr().cast(), size: record.key.len() };
            vus[3].u.mem = Mem { data: record.value.as_ptr().cast(), size: record.value.len() };
            vus[5].u.header = Header {
                name: c"request_id".as_ptr(), value: record.request_id.as_ptr().cast(), size: record.request_id.len() as isize,
            };
            // Copied by librdkafka before it returns (MSG_F_COPY; headers always are).
            let error = unsafe { (self.produceva)(rk, vus.as_ptr(), vus.len()) };
            if !error.is_null() {
                let code = unsafe { (self.error_code)(error) };
                let text = unsafe { CStr::from_ptr((self.error_string)(error)) }.to_string_lossy().into_owned();
                unsafe { (self.error_destroy)(error) };
                return Ok((at, Some((code, text))));
            }
        }
        Ok((range.end, None))
    }
}

#[pymethods]
impl Kafka {
    /// Binds to the librdkafka confluent-kafka loaded (importing confluent_kafka);
    /// RuntimeError when there is none to bind to.
    #[new]
    fn new(py: Python) -> PyResult<Self> {
        let producer_type = py.import_bound("confluent_kafka")?.getattr("Producer")?.unbind();
        let path = loaded_librdkafka().ok_or_else(|| unavailable("no librdkafka loaded in this process"))?;
        // RTLD_NOLOAD: the copy already loaded, or nothing.
        let library = unsafe { Library::open(Some(&path), libc::RTLD_NOW | libc::RTLD_NOLOAD) }.map_err(unavailable)?;
        unsafe {
            Ok(Kafka {
                produceva: library.get(b"rd_kafka_produceva\0").map_err(unavailable)?,
                opaque: library.get(b"rd_kafka_opaque\0").map_err(unavailable)?,
                error_code: library.get(b"rd_kafka_error_code\0").map_err(unavailable)?,
                error_string: library.get(b"rd_kafka_error_string\0").map_err(unavailable)?,
                error_destroy: library.get(b"rd_kafka_error_destroy\0").map_err(unavailable)?,
                _library: library,
                producer_type,
            })
        }
    }

    /// Checks that `producer` is a confluent-kafka Producer this can produce into.
    fn check(&self, producer: &Bound<PyAny>) -> PyResult<()> {
        self.handle(producer).map(|_| ())
    }

    /// Produce one record (for tests): -> None, or (error code, text).
    fn produce_one(
        &self, producer: &Bound<PyAny>, topic: &str, partition: i32, key: &[u8], value: &[u8], request_id: &[u8],
    ) -> PyResult<Option<(i32, String)>> {
        let topic = CString::new(topic).map_err(|_| PyRuntimeError::new_err("a topic name with a NUL"))?;
        Ok(self.produce(producer, partition, 0..1, |_| Some(Record { topic: &topic, key, value, request_id }))?.1)
    }
}
