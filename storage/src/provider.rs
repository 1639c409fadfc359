//! The DataFusion view of a table: each scan reads one [`Version`], hot batches and cold
//! files together, so hot and cold are one table.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use object_store::ObjectMeta;
use object_store::path::Path as ObjectPath;

use crate::table::Table;

#[derive(Debug)]
pub(crate) struct SnapshotTable {
    table: Arc<Table>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("name", &self.spec.name)
            .finish_non_exhaustive()
    }
}

impl SnapshotTable {
    pub(crate) fn new(table: Arc<Table>) -> Self {
        SnapshotTable { table }
    }
}

#[async_trait]
impl TableProvider for SnapshotTable {
    fn schema(&self) -> SchemaRef {
        self.table.spec.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Filters are applied above the scan; the Parquet scan also uses them to prune row
    /// groups and pages (DataFusion pushes them into it).
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let version = self.table.snapshot();
        let schema = self.schema();
        let partitions = state.config().target_partitions().max(1);
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();

        if !version.hot.is_empty() {
            let n = partitions.min(version.hot.len());
            let mut groups = vec![Vec::new(); n];
            for (i, hot) in version.hot.iter().enumerate() {
                groups[i % n].push(hot.batch.clone());
            }
            inputs.push(MemorySourceConfig::try_new_exec(
                &groups,
                schema.clone(),
                projection.cloned(),
            )?);
        }

        if !version.files.is_empty() {
            let n = partitions.min(version.files.len());
            let mut groups = vec![Vec::new(); n];
            for (i, file) in version.files.iter().enumerate() {
                let location = ObjectPath::from_absolute_path(&file.path)
                    .map_err(|e| DataFusionError::External(Box::new(e)))?;
                groups[i % n].push(PartitionedFile::new_from_meta(ObjectMeta {
                    location,
                    last_modified: chrono::DateTime::UNIX_EPOCH,
                    size: file.size,
                    e_tag: None,
                    version: None,
                }));
            }
            let source = Arc::new(ParquetSource::new(schema.clone()));
            let config = FileScanConfigBuilder::new(ObjectStoreUrl::local_filesystem(), source)
                .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
                .with_projection_indices(projection.cloned())?
                .with_limit(limit)
                .build();
            let format = datafusion::datasource::file_format::parquet::ParquetFormat::default()
                .with_options(state.table_options().parquet.clone());
            use datafusion::datasource::file_format::FileFormat;
            inputs.push(format.create_physical_plan(state, config).await?);
        }

        match inputs.len() {
            0 => Ok(Arc::new(EmptyExec::new(match projection {
                Some(p) => Arc::new(schema.project(p)?),
                None => schema,
            }))),
            _ => UnionExec::try_new(inputs),
        }
    }
}
