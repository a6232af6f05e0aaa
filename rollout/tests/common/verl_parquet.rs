//! Writes Parquet files in verl's prompt layout (used by the dataset tests and the load benchmark):
//! `data_source: string`, `prompt: list<struct<role, content>>`, `ability: string`,
//! `reward_model: struct<ground_truth: string, style: string>`,
//! `extra_info: struct<split: string, index: int64, answer: string, question: string>`.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{Int64Builder, ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Fields};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

/// Row `i`'s question, answer and ground truth.
pub fn row_text(i: usize) -> (String, String, String) {
    let (a, b) = (i % 977, (i * 7) % 1013);
    let question = format!("Natalia sold clips to {a} of her friends in April, and then she sold {b} clips in May. How many clips did Natalia sell altogether in April and May?");
    let answer = format!(
        "Natalia sold {a}+{b} = <<{a}+{b}={s}>>{s} clips altogether.\n#### {s}",
        s = a + b
    );
    (question, answer, (a + b).to_string())
}

/// Writes `rows` rows; rows whose index is a multiple of `null_prompt_every` get a null prompt
/// (malformed). Snappy-compressed like pyarrow's default, in row groups of 10,000.
pub fn write_verl_parquet(
    path: &Path,
    rows: usize,
    null_prompt_every: Option<usize>,
) -> Result<(), Box<dyn std::error::Error>> {
    let message_fields = Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ]);
    let rm_fields = Fields::from(vec![
        Field::new("ground_truth", DataType::Utf8, true),
        Field::new("style", DataType::Utf8, true),
    ]);
    let extra_fields = Fields::from(vec![
        Field::new("split", DataType::Utf8, true),
        Field::new("index", DataType::Int64, true),
        Field::new("answer", DataType::Utf8, true),
        Field::new("question", DataType::Utf8, true),
    ]);
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(10_000))
        .build();
    let file = File::create(path)?;
    let mut writer: Option<ArrowWriter<File>> = None;
    let chunk = 10_000;
    let mut start = 0;
    while start < rows {
        let end = (start + chunk).min(rows);
        let mut data_source = StringBuilder::new();
        let mut ability = StringBuilder::new();
        let mut prompt = ListBuilder::new(StructBuilder::from_fields(message_fields.clone(), 1));
        let mut reward_model = StructBuilder::from_fields(rm_fields.clone(), end - start);
        let mut extra = StructBuilder::from_fields(extra_fields.clone(), end - start);
        for i in start..end {
            let (question, answer, gt) = row_text(i);
            data_source.append_value("openai/gsm8k");
            ability.append_value("math");
            if null_prompt_every.is_some_and(|k| i % k == 0) {
                prompt.append(false);
            } else {
                let m = prompt.values();
                m.field_builder::<StringBuilder>(0)
                    .expect("role")
                    .append_value("user");
                m.field_builder::<StringBuilder>(1)
                    .expect("content")
                    .append_value(format!("{question} Let's think step by step and output the final answer after \"####\"."));
                m.append(true);
                prompt.append(true);
            }
            reward_model
                .field_builder::<StringBuilder>(0)
                .expect("gt")
                .append_value(&gt);
            reward_model
                .field_builder::<StringBuilder>(1)
                .expect("style")
                .append_value("rule");
            reward_model.append(true);
            extra
                .field_builder::<StringBuilder>(0)
                .expect("split")
                .append_value("train");
            extra
                .field_builder::<Int64Builder>(1)
                .expect("index")
                .append_value(i as i64);
            extra
                .field_builder::<StringBuilder>(2)
                .expect("answer")
                .append_value(&answer);
            extra
                .field_builder::<StringBuilder>(3)
                .expect("question")
                .append_value(&question);
            extra.append(true);
        }
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("data_source", Arc::new(data_source.finish())),
            ("prompt", Arc::new(prompt.finish())),
            ("ability", Arc::new(ability.finish())),
            ("reward_model", Arc::new(reward_model.finish())),
            ("extra_info", Arc::new(extra.finish())),
        ];
        let batch = RecordBatch::try_from_iter(columns)?;
        if writer.is_none() {
            writer = Some(ArrowWriter::try_new(
                file.try_clone()?,
                batch.schema(),
                Some(props.clone()),
            )?);
        }
        if let Some(w) = writer.as_mut() {
            w.write(&batch)?;
        }
        start = end;
    }
    if let Some(w) = writer {
        w.close()?;
    }
    Ok(())
}
