//! Query results as text or bytes: an aligned table, CSV, JSON (an array of objects)
//! or an Arrow IPC stream.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// Output formats of `sluice sql` and `/query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Format {
    Table,
    Csv,
    Json,
    Arrow,
}

impl Format {
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Table => "text/plain; charset=utf-8",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Json => "application/json",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

/// Encodes a result. An empty result still carries its columns (table header, CSV
/// header, Arrow schema).
pub(crate) fn encode(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        Format::Table => {
            let text = if batches.iter().all(|b| b.num_rows() == 0) {
                arrow::util::pretty::pretty_format_batches(&[RecordBatch::new_empty(
                    schema.clone(),
                )])?
            } else {
                arrow::util::pretty::pretty_format_batches(batches)?
            };
            out.extend_from_slice(text.to_string().as_bytes());
            out.push(b'\n');
        }
        Format::Csv => {
            let flat_schema = flat_schema(schema);
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            if batches.is_empty() {
                writer.write(&RecordBatch::new_empty(flat_schema.clone()))?;
            }
            for batch in batches {
                writer.write(&flatten(batch, &flat_schema)?)?;
            }
        }
        Format::Json => {
            let mut writer = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::JsonArray>(&mut out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
            out.push(b'\n');
        }
        Format::Arrow => {
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, schema)?;
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
    }
    Ok(out)
}

/// Decodes an Arrow IPC stream (what `sluice sql --server` receives).
pub(crate) fn decode_arrow(bytes: &[u8]) -> anyhow::Result<(SchemaRef, Vec<RecordBatch>)> {
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// CSV has no nested or binary values: those columns become their display text.
fn needs_text(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Map(..)
            | DataType::Struct(_)
            | DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(..)
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
    )
}

fn flat_schema(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| {
                if needs_text(f.data_type()) {
                    Field::new(f.name(), DataType::Utf8, true)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect::<Vec<_>>(),
    ))
}

fn flatten(batch: &RecordBatch, flat_schema: &SchemaRef) -> anyhow::Result<RecordBatch> {
    let options = FormatOptions::default();
    let columns = batch
        .columns()
        .iter()
        .map(|column| -> anyhow::Result<ArrayRef> {
            if !needs_text(column.data_type()) {
                return Ok(column.clone());
            }
            let formatter = ArrayFormatter::try_new(column.as_ref(), &options)?;
            let text: StringArray = (0..column.len())
                .map(|i| column.is_valid(i).then(|| formatter.value(i).to_string()))
                .collect();
            Ok(Arc::new(text))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(flat_schema.clone(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryArray, Float64Array, Int64Array};

    fn sample() -> (SchemaRef, Vec<RecordBatch>) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("x", DataType::Float64, true),
            Field::new("raw", DataType::Binary, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(Float64Array::from(vec![Some(0.1 + 0.2), None])),
                Arc::new(BinaryArray::from(vec![&b"ab"[..], b"c"])),
            ],
        )
        .unwrap();
        (schema, vec![batch])
    }

    #[test]
    fn every_format_encodes_the_rows() {
        let (schema, batches) = sample();
        let csv = String::from_utf8(encode(Format::Csv, &schema, &batches).unwrap()).unwrap();
        assert_eq!(csv, "n,x,raw\n1,0.30000000000000004,6162\n2,,63\n");
        let json: serde_json::Value =
            serde_json::from_slice(&encode(Format::Json, &schema, &batches).unwrap()).unwrap();
        assert_eq!(json[0]["x"], 0.30000000000000004);
        assert_eq!(json[1]["n"], 2);
        assert!(
            json[1]["x"].is_null() && json[1].get("x").is_some(),
            "nulls are explicit"
        );
        let table = String::from_utf8(encode(Format::Table, &schema, &batches).unwrap()).unwrap();
        assert!(table.contains("| n | x"), "{table}");
        let (decoded_schema, decoded) =
            decode_arrow(&encode(Format::Arrow, &schema, &batches).unwrap()).unwrap();
        assert_eq!(decoded_schema, schema);
        assert_eq!(decoded, batches);
    }

    #[test]
    fn empty_results_keep_their_columns() {
        let (schema, _) = sample();
        let csv = String::from_utf8(encode(Format::Csv, &schema, &[]).unwrap()).unwrap();
        assert_eq!(csv, "n,x,raw\n");
        assert_eq!(encode(Format::Json, &schema, &[]).unwrap(), b"[]\n");
        let table = String::from_utf8(encode(Format::Table, &schema, &[]).unwrap()).unwrap();
        assert!(table.contains("| n | x | raw |"), "{table}");
    }
}
