//! Experiment tracking of a job: the TensorBoard event files of the run directory, read back by a
//! reader written here from the TFRecord and protobuf specifications (checksums checked), hold
//! every value of metrics.jsonl at its step, and the recipe; an MLflow stand-in server on
//! localhost (named by `MLFLOW_TRACKING_URI`) receives the experiment, the run, the recipe as
//! params, every metric and the end of the run; an unreachable MLflow server only warns.
mod common;

use common::{linearize, stderr, TinyJob};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// CRC-32C bit by bit (Castagnoli polynomial, reflected), independent of the writer's crate.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The records of a TFRecord file, every length and data checksum verified.
fn tf_records(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(len_crc, masked(len_bytes), "length checksum at {at}");
        let data = &bytes[at + 12..at + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(data_crc, masked(data), "data checksum at {at}");
        records.push(data.to_vec());
        at += 16 + len;
    }
    records
}

/// A protobuf field's value: varint, 64-bit, length-delimited or 32-bit.
#[derive(Debug, Clone)]
enum Wire {
    Varint(u64),
    Fixed64(f64),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

fn varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut value = 0;
    for shift in (0..64).step_by(7) {
        let byte = bytes[*at];
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    value
}

/// The fields of a protobuf message, by number, in order.
fn fields(bytes: &[u8]) -> Vec<(u64, Wire)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let key = varint(bytes, &mut at);
        let value = match key & 7 {
            0 => Wire::Varint(varint(bytes, &mut at)),
            1 => {
                at += 8;
                Wire::Fixed64(f64::from_le_bytes(bytes[at - 8..at].try_into().unwrap()))
            }
            2 => {
                let len = varint(bytes, &mut at) as usize;
                at += len;
                Wire::Bytes(bytes[at - len..at].to_vec())
            }
            5 => {
                at += 4;
                Wire::Fixed32(bytes[at - 4..at].try_into().unwrap())
            }
            other => panic!("wire type {other}"),
        };
        out.push((key >> 3, value));
    }
    out
}

fn field(message: &[(u64, Wire)], number: u64) -> Option<Wire> {
    message
        .iter()
        .find(|(n, _)| *n == number)
        .map(|(_, v)| v.clone())
}

fn bytes_of(wire: Option<Wire>) -> Vec<u8> {
    match wire {
        Some(Wire::Bytes(b)) => b,
        other => panic!("expected bytes, got {other:?}"),
    }
}

/// Every scalar (tag, step) -> value and every text summary tag -> text of the event files of
/// `dir`.
fn read_events(dir: &Path) -> (BTreeMap<(String, i64), f32>, BTreeMap<String, String>) {
    let mut scalars = BTreeMap::new();
    let mut texts = BTreeMap::new();
    let mut versions = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        assert!(
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("events.out.tfevents."),
            "{}",
            path.display()
        );
        for record in tf_records(&path) {
            // Event { wall_time = 1; step = 2; file_version = 3; summary = 5 }
            let event = fields(&record);
            if field(&event, 3).is_some() {
                assert_eq!(bytes_of(field(&event, 3)), b"brain.Event:2");
                versions += 1;
                continue;
            }
            let step = match field(&event, 2) {
                Some(Wire::Varint(v)) => v as i64,
                None => 0,
                other => panic!("step {other:?}"),
            };
            // wall_time: the Unix time of the write.
            assert!(matches!(field(&event, 1), Some(Wire::Fixed64(t)) if t > 1.6e9));
            for (number, value) in fields(&bytes_of(field(&event, 5))) {
                assert_eq!(number, 1);
                let Wire::Bytes(value) = value else { panic!() };
                // Value { tag = 1; simple_value = 2; tensor = 8; metadata = 9 }
                let value = fields(&value);
                let tag = String::from_utf8(bytes_of(field(&value, 1))).unwrap();
                match field(&value, 2) {
                    Some(Wire::Fixed32(v)) => {
                        scalars.insert((tag, step), f32::from_le_bytes(v));
                    }
                    _ => {
                        // TensorProto { dtype = 1: DT_STRING (7); string_val = 8 }
                        let tensor = fields(&bytes_of(field(&value, 8)));
                        assert!(matches!(field(&tensor, 1), Some(Wire::Varint(7))));
                        let metadata = fields(&bytes_of(field(&value, 9)));
                        let plugin = fields(&bytes_of(field(&metadata, 1)));
                        assert_eq!(bytes_of(field(&plugin, 1)), b"text");
                        let text = String::from_utf8(bytes_of(field(&tensor, 8))).unwrap();
                        texts.insert(tag, text);
                    }
                }
            }
        }
    }
    assert!(versions > 0, "no file_version event in {}", dir.display());
    (scalars, texts)
}

/// The path and JSON body of each request, in order.
type Requests = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// A stand-in MLflow server: answers the calls the sink makes (get-by-name: not found) and
/// records each request's path and JSON body.
fn mlflow_server() -> (String, Requests) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let requests = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            let (status, answer) = if path.contains("get-by-name") {
                (
                    "404 Not Found",
                    r#"{"error_code": "RESOURCE_DOES_NOT_EXIST"}"#,
                )
            } else if path.ends_with("experiments/create") {
                ("200 OK", r#"{"experiment_id": "7"}"#)
            } else if path.ends_with("runs/create") {
                ("200 OK", r#"{"run": {"info": {"run_id": "run-1"}}}"#)
            } else {
                ("200 OK", "{}")
            };
            requests.lock().unwrap().push((path, json));
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    (uri, log)
}

#[test]
fn tensorboard_and_mlflow_receive_every_metric() {
    let job = TinyJob::new();
    let out = job.out("run");
    let (uri, requests) = mlflow_server();
    let mut args = vec![
        "--recipe".to_string(),
        job.recipe.display().to_string(),
        "--output".to_string(),
        out.display().to_string(),
    ];
    for set in [
        "attention_transfer.max_steps=4",
        "attention_transfer.eval_every=2",
        "attention_transfer.schedule.warmup_steps=1",
        // Stage 1's KL term: its values reach the sinks as every other.
        "attention_transfer.kl_factor=0.5",
        "lora.max_steps=2",
        "lora.eval_every=1",
    ] {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = linearize(&args)
        .env("MLFLOW_TRACKING_URI", &uri)
        .env_remove("MLFLOW_EXPERIMENT_NAME")
        .env_remove("MLFLOW_TRACKING_TOKEN")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));

    let records: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records.iter().any(|r| r["split"] == "val"));
    for split in ["train", "val"] {
        assert!(
            records.iter().any(|r| r["stage"] == "attention_transfer"
                && r["split"] == split
                && r["kl"].as_f64().is_some_and(|kl| kl > 0.0)),
            "no stage-1 {split} record with a KL"
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("validation KL(teacher || student) per token"),
        "{stdout}"
    );
    let (scalars, texts) = read_events(&out.join("tensorboard"));
    assert!(texts["recipe"].contains("name: tiny"), "{texts:?}");
    let mut expected = 0;
    for record in &records {
        let stage = record["stage"].as_str().unwrap();
        let split = record["split"].as_str().unwrap();
        let step = record["step"].as_i64().unwrap();
        for (key, value) in record.as_object().unwrap() {
            if matches!(key.as_str(), "stage" | "split" | "step" | "time") {
                continue;
            }
            let tag = format!("{stage}/{split}/{key}");
            let logged = scalars
                .get(&(tag.clone(), step))
                .unwrap_or_else(|| panic!("{tag} at step {step} is not in the event files"));
            let value = value.as_f64().unwrap_or(f64::NAN);
            assert!(
                (*logged == value as f32) || (logged.is_nan() && value.is_nan()),
                "{tag} at step {step}: {logged} in TensorBoard, {value} in metrics.jsonl"
            );
            expected += 1;
        }
    }
    assert_eq!(scalars.len(), expected, "scalars beyond metrics.jsonl");

    let requests = requests.lock().unwrap().clone();
    let paths: Vec<&str> = requests.iter().map(|(p, _)| p.as_str()).collect();
    assert!(paths[0].contains("experiments/get-by-name?experiment_name=linearize"));
    assert!(paths[1].ends_with("experiments/create") && paths[2].ends_with("runs/create"));
    assert_eq!(requests[2].1["experiment_id"], "7");
    assert_eq!(requests[2].1["run_name"], "tiny");
    let params: BTreeMap<String, String> = requests
        .iter()
        .flat_map(|(_, body)| body["params"].as_array().cloned().unwrap_or_default())
        .map(|p| {
            (
                p["key"].as_str().unwrap().to_string(),
                p["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(params["attention_transfer.max_steps"], "4");
    assert_eq!(params["conversion.attention.method"], "lolcats");
    let metrics: Vec<&serde_json::Value> = requests
        .iter()
        .filter(|(_, body)| body["run_id"] == "run-1")
        .flat_map(|(_, body)| body["metrics"].as_array().into_iter().flatten())
        .collect();
    let finite = scalars.values().filter(|v| v.is_finite()).count();
    assert_eq!(metrics.len(), finite);
    for metric in metrics {
        let tag = metric["key"].as_str().unwrap().to_string();
        let step = metric["step"].as_i64().unwrap();
        assert_eq!(
            metric["value"].as_f64().unwrap() as f32,
            scalars[&(tag, step)]
        );
    }
    let (last, end) = requests.last().unwrap();
    assert!(last.ends_with("runs/update"), "{last}");
    assert_eq!(end["status"], "FINISHED");

    // An MLflow server that does not answer: a warning, and the job still finishes (it resumes
    // the finished run).
    let output = linearize(&args)
        .env("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("MLflow"), "{}", stderr(&output));
}
