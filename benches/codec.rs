//! Codec cost per record: `cargo bench --bench codec`.
//!
//! A TaskRequest with a 200-byte payload, a key and one metadata pair (a
//! typical web-app task), and the TaskResult a processor would write for it.
//! apache-avro's generic `Value` path on the same record is measured in the
//! same run as the baseline DESIGN.md §6 quotes (~3 µs).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that cannot run stops

use std::hint::black_box;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use conveyor::codec::schema::TASK_REQUEST_AVSC;

fn task_request_schema() -> Result<apache_avro::Schema, apache_avro::Error> {
    apache_avro::Schema::parse_str(TASK_REQUEST_AVSC)
}
use conveyor::codec::{Codec, TaskRequest, TaskResult, TaskStatus, DEFAULT_CONTENT_TYPE};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn request() -> TaskRequest {
    // 200 bytes of JSON-looking payload.
    let mut payload = br#"{"image":"s3://bucket/photos/2026/11/26/"#.to_vec();
    payload.resize(198, b'x');
    payload.extend_from_slice(br#""}"#);
    let mut req = TaskRequest::new("resize_image", payload);
    req.key = Some("user-1234".into());
    req.metadata.insert("tenant".into(), "acme".into());
    req
}

fn result_for(req: &TaskRequest) -> TaskResult {
    TaskResult {
        id: req.id,
        task_type: req.task_type.clone(),
        status: TaskStatus::Succeeded,
        output: Some(req.payload.clone()),
        content_type: DEFAULT_CONTENT_TYPE.into(),
        error: None,
        attempts: 1,
        started_at: req.submitted_at,
        finished_at: req.submitted_at + 3,
        worker: "bench-host/1".into(),
        workflow: None,
    }
}

fn codec(c: &mut Criterion) {
    let codec = Codec::default();
    let req = request();
    let mut encoded = Vec::new();
    codec.encode_request(&req, &mut encoded);
    let res = result_for(&req);

    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(512);
    group.bench_function("encode_request_200B", |b| {
        b.iter(|| {
            buf.clear();
            codec.encode_request(black_box(&req), &mut buf);
            black_box(buf.len())
        })
    });
    group.bench_function("decode_request_200B", |b| {
        b.iter(|| codec.decode_request(black_box(&encoded)))
    });
    group.bench_function("encode_result_200B", |b| {
        b.iter(|| {
            buf.clear();
            codec.encode_result(black_box(&res), &mut buf);
            black_box(buf.len())
        })
    });
    // What the processor does per task with the echo handler: decode the
    // request, encode the request again (the target's "decode+encode").
    group.bench_function("decode_plus_encode_request_200B", |b| {
        b.iter(|| {
            let decoded = codec.decode_request(black_box(&encoded)).expect("decodes");
            buf.clear();
            codec.encode_request(&decoded, &mut buf);
            black_box(buf.len())
        })
    });
    // decode the request, build and encode its result.
    group.bench_function("decode_request_encode_result_200B", |b| {
        b.iter(|| {
            let decoded = codec.decode_request(black_box(&encoded)).expect("decodes");
            let res = result_for(&decoded);
            buf.clear();
            codec.encode_result(&res, &mut buf);
            black_box(buf.len())
        })
    });

    // Baseline: apache-avro's generic Value path on the same bytes.
    let schema = task_request_schema().expect("schema parses");
    let reader = GenericDatumReader::builder(&schema)
        .build()
        .expect("reader");
    let writer = GenericDatumWriter::builder(&schema)
        .build()
        .expect("writer");
    group.bench_function("apache_avro_value_decode_plus_encode_200B", |b| {
        b.iter(|| {
            let value: Value = reader
                .read_value(&mut black_box(&encoded[..]))
                .expect("decodes");
            black_box(writer.write_value_to_vec(value).expect("encodes"))
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
