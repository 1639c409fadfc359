//! `sluice sql`: one query or an interactive prompt, against a live server (hot + cold)
//! or offline over a data directory's Parquet files.

use std::path::PathBuf;

use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use sluice_storage::Storage;

use crate::output::{self, Format};
use crate::server::table_specs;

pub(crate) enum Backend {
    Server {
        url: String,
        client: reqwest::blocking::Client,
        /// Sent as `Authorization: Bearer` (the server's `http.token`).
        token: Option<String>,
    },
    Offline {
        storage: Storage,
        runtime: tokio::runtime::Runtime,
    },
}

impl Backend {
    pub(crate) fn server(url: &str, token: Option<String>) -> anyhow::Result<Backend> {
        let url = url.trim_end_matches('/').to_owned();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--server must be an http:// URL, got {url:?}");
        }
        let client = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .context("creating the HTTP client")?;
        Ok(Backend::Server { url, client, token })
    }

    pub(crate) fn offline(data_dir: PathBuf) -> anyhow::Result<Backend> {
        if !data_dir.is_dir() {
            bail!("data directory {} does not exist", data_dir.display());
        }
        let storage = Storage::open_read_only(&data_dir, table_specs())
            .with_context(|| format!("reading {}", data_dir.display()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the query runtime")?;
        Ok(Backend::Offline { storage, runtime })
    }

    pub(crate) fn query(&self, sql: &str) -> anyhow::Result<(SchemaRef, Vec<RecordBatch>)> {
        match self {
            Backend::Server { url, client, token } => {
                let mut request = client
                    .post(format!("{url}/query?format=arrow"))
                    .header("content-type", "text/plain; charset=utf-8")
                    .body(sql.to_owned());
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let response = request
                    .send()
                    .with_context(|| format!("cannot reach the sluice server at {url}"))?;
                let status = response.status();
                let body = response.bytes().context("reading the server's answer")?;
                if !status.is_success() {
                    let message = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
                    bail!("{message}");
                }
                output::decode_arrow(&body).context("decoding the server's answer")
            }
            Backend::Offline { storage, runtime } => {
                let result = runtime.block_on(storage.sql(sql))?;
                Ok((result.schema, result.batches))
            }
        }
    }
}

/// Runs one query and prints it.
pub(crate) fn run_one(backend: &Backend, sql: &str, format: Format) -> anyhow::Result<()> {
    let (schema, batches) = backend.query(sql)?;
    print(format, &schema, &batches)
}

fn print(format: Format, schema: &SchemaRef, batches: &[RecordBatch]) -> anyhow::Result<()> {
    use std::io::Write;
    let bytes = output::encode(format, schema, batches)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&bytes)?;
    stdout.flush()?;
    Ok(())
}

/// The interactive prompt: statements end with `;`; `\q` or Ctrl-D leaves.
pub(crate) fn repl(backend: &Backend, format: Format) -> anyhow::Result<()> {
    let mut editor = rustyline::DefaultEditor::new().context("starting the prompt")?;
    eprintln!("sluice SQL. Tables: telemetry, rejects. End statements with ';', \\q to quit.");
    let mut statement = String::new();
    loop {
        let prompt = if statement.is_empty() {
            "sluice> "
        } else {
            "   ...> "
        };
        match editor.readline(prompt) {
            Ok(line) => {
                let trimmed = line.trim();
                if statement.is_empty() && matches!(trimmed, "\\q" | "quit" | "exit") {
                    return Ok(());
                }
                if trimmed.is_empty() && statement.is_empty() {
                    continue;
                }
                statement.push_str(&line);
                statement.push('\n');
                if trimmed.ends_with(';') {
                    let _ = editor.add_history_entry(statement.trim());
                    let started = std::time::Instant::now();
                    match backend.query(&statement) {
                        Ok((schema, batches)) => {
                            print(format, &schema, &batches)?;
                            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
                            eprintln!("({rows} rows, {:.3} s)", started.elapsed().as_secs_f64());
                        }
                        Err(e) => eprintln!("error: {e:#}"),
                    }
                    statement.clear();
                }
            }
            Err(rustyline::error::ReadlineError::Interrupted) => statement.clear(),
            Err(rustyline::error::ReadlineError::Eof) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}
