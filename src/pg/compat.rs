//! What PostgreSQL clients ask of a server that DataFusion answers differently:
//! - `current_setting(name)` (Grafana's version probe and search_path lookups);
//! - `information_schema.columns.data_type` in PostgreSQL's words (`double precision`,
//!   `timestamp with time zone`, …) instead of Arrow's (`Float64`, `Timestamp(ns, "UTC")`):
//!   Grafana's query builder picks number, text and time operators by these names.

use std::ops::ControlFlow;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::ParamValues;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{
    ColumnarValue, LogicalPlan, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    TypeSignature, Volatility,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    Ident, ObjectName, Query, Statement, TableAlias, TableFactor, VisitMut, VisitorMut,
    visit_relations,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion_postgres::QueryHook;
use datafusion_postgres::arrow_pg::datatypes::df::encode_dataframe;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::pgwire::api::ClientInfo;
use datafusion_postgres::pgwire::api::portal::Format;
use datafusion_postgres::pgwire::api::results::Response;
use datafusion_postgres::pgwire::error::{PgWireError, PgWireResult};

/// Registers the functions of this module on `ctx`.
pub(super) fn register(ctx: &SessionContext) {
    ctx.register_udf(TextFunction::current_setting());
    ctx.register_udf(TextFunction::pg_type_name());
}

/// Server settings as `current_setting(name)` reports them (Grafana asks for
/// `server_version_num` and `search_path`). The version is the one pgwire announces at
/// startup; sluice's tables live in the one schema `public`.
const SETTINGS: [(&str, &str); 9] = [
    ("server_version", "16.6"),
    ("server_version_num", "160006"),
    ("search_path", "public"),
    ("timezone", "UTC"),
    ("client_encoding", "UTF8"),
    ("server_encoding", "UTF8"),
    ("datestyle", "ISO, MDY"),
    ("standard_conforming_strings", "on"),
    ("integer_datetimes", "on"),
];

/// PostgreSQL's `current_setting(name [, missing_ok])`: one of [`SETTINGS`] (names are
/// case-insensitive), an error naming an unknown one, or NULL for it with `missing_ok`.
fn current_setting(name: &str, missing_ok: bool) -> Result<Option<&'static str>, String> {
    match SETTINGS
        .iter()
        .find(|(known, _)| known.eq_ignore_ascii_case(name))
    {
        Some((_, value)) => Ok(Some(value)),
        None if missing_ok => Ok(None),
        None => Err(format!("unrecognized configuration parameter \"{name}\"")),
    }
}

/// The name `information_schema.columns.data_type` has in PostgreSQL for a column of
/// Arrow type `arrow` (as DataFusion's information_schema prints it).
fn pg_type_name(arrow: &str) -> &'static str {
    match arrow {
        "Utf8" | "LargeUtf8" | "Utf8View" => "text",
        "Float64" => "double precision",
        "Float32" | "Float16" => "real",
        "Int64" | "UInt32" => "bigint",
        "Int32" | "UInt16" => "integer",
        "Int16" | "Int8" | "UInt8" => "smallint",
        "UInt64" => "numeric",
        "Boolean" => "boolean",
        "Date32" | "Date64" => "date",
        "Binary" | "LargeBinary" | "BinaryView" => "bytea",
        "Null" => "unknown",
        // `Timestamp(ns, "UTC")`: a time zone follows the unit.
        t if t.starts_with("Timestamp(") && t.contains(',') && !t.ends_with(", None)") => {
            "timestamp with time zone"
        }
        t if t.starts_with("Timestamp(") => "timestamp without time zone",
        t if t.starts_with("Time32(") || t.starts_with("Time64(") => "time without time zone",
        t if t.starts_with("Interval(") || t.starts_with("Duration(") => "interval",
        t if t.starts_with("Decimal") => "numeric",
        t if t.starts_with("List(")
            || t.starts_with("LargeList(")
            || t.starts_with("FixedSizeList(")
            || t.starts_with("ListView(") =>
        {
            "ARRAY"
        }
        // Maps and structs (`extra`) reach clients as text (as `\d` says, too).
        _ => "text",
    }
}

/// A SQL function from text (and an optional boolean flag) to text, NULL in NULL out:
/// `current_setting` and `sluice_pg_type_name` (the latter for the rewritten
/// `information_schema.columns`).
#[derive(Debug)]
struct TextFunction {
    name: &'static str,
    signature: Signature,
    apply: fn(&str, bool) -> Result<Option<&'static str>, String>,
}

impl TextFunction {
    fn current_setting() -> ScalarUDF {
        ScalarUDF::from(TextFunction {
            name: "current_setting",
            signature: Signature::one_of(
                vec![
                    TypeSignature::Exact(vec![DataType::Utf8]),
                    TypeSignature::Exact(vec![DataType::Utf8, DataType::Boolean]),
                ],
                Volatility::Stable,
            ),
            apply: current_setting,
        })
    }

    fn pg_type_name() -> ScalarUDF {
        ScalarUDF::from(TextFunction {
            name: "sluice_pg_type_name",
            signature: Signature::exact(vec![DataType::Utf8], Volatility::Immutable),
            apply: |arrow, _| Ok(Some(pg_type_name(arrow))),
        })
    }
}

// DataFusion compares functions by value; a name is one function.
impl PartialEq for TextFunction {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for TextFunction {}

impl std::hash::Hash for TextFunction {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl ScalarUDFImpl for TextFunction {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let texts = arrays[0].as_string::<i32>();
        let flags = arrays.get(1).map(|a| a.as_boolean());
        let values = (0..texts.len())
            .map(|row| {
                if texts.is_null(row) {
                    return Ok(None);
                }
                let flag = flags.is_some_and(|f| f.is_valid(row) && f.value(row));
                (self.apply)(texts.value(row), flag).map_err(DataFusionError::Plan)
            })
            .collect::<datafusion::error::Result<StringArray>>()?;
        Ok(ColumnarValue::Array(Arc::new(values)))
    }
}

/// What `information_schema.columns` is replaced with: DataFusion's, with `data_type` in
/// PostgreSQL's words. Named with the catalog so that the rewrite does not match it again.
const COLUMNS: &str = "SELECT table_catalog, table_schema, table_name, column_name, \
    ordinal_position, column_default, is_nullable, \
    sluice_pg_type_name(data_type) AS data_type, character_maximum_length, \
    character_octet_length, numeric_precision, numeric_precision_radix, numeric_scale, \
    datetime_precision, interval_type FROM sluice.information_schema.columns";

/// Replaces each `information_schema.columns` a query reads by [`COLUMNS`] (keeping its
/// alias, or naming it `columns`); `None` when the statement reads no such table.
fn rewrite_columns(statement: &Statement) -> Option<Statement> {
    struct Rewrite {
        columns: Box<Query>,
        found: bool,
    }
    impl VisitorMut for Rewrite {
        type Break = ();
        // After the children: the subquery put in is not visited again.
        fn post_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } = factor
                && is_information_schema_columns(name)
            {
                let alias = alias.take().unwrap_or_else(|| TableAlias {
                    name: Ident::new("columns"),
                    columns: vec![],
                    explicit: true,
                    at: None,
                });
                *factor = TableFactor::Derived {
                    lateral: false,
                    subquery: self.columns.clone(),
                    alias: Some(alias),
                    sample: None,
                };
                self.found = true;
            }
            ControlFlow::Continue(())
        }
    }
    static COLUMNS_QUERY: LazyLock<Box<Query>> = LazyLock::new(|| {
        match Parser::new(&PostgreSqlDialect {})
            .try_with_sql(COLUMNS)
            .and_then(|mut p| p.parse_statement())
        {
            Ok(Statement::Query(query)) => query,
            other => panic!("COLUMNS is not a query: {other:?}"),
        }
    });
    // Every query of a PostgreSQL client passes here: look before copying anything.
    let reads_columns = matches!(statement, Statement::Query(_))
        && visit_relations(statement, |name| {
            if is_information_schema_columns(name) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .is_break();
    if !reads_columns {
        return None;
    }
    let mut rewrite = Rewrite {
        columns: COLUMNS_QUERY.clone(),
        found: false,
    };
    let mut statement = statement.clone();
    let _ = statement.visit(&mut rewrite);
    rewrite.found.then_some(statement)
}

fn is_information_schema_columns(name: &ObjectName) -> bool {
    let part = |i: usize, want: &str| {
        name.0
            .get(i)
            .and_then(|p| p.as_ident())
            .is_some_and(|ident| ident.value.eq_ignore_ascii_case(want))
    };
    name.0.len() == 2 && part(0, "information_schema") && part(1, "columns")
}

async fn plan(ctx: &SessionContext, statement: Statement) -> PgWireResult<LogicalPlan> {
    ctx.state()
        .statement_to_plan(DfStatement::Statement(Box::new(statement)))
        .await
        .map_err(|e| PgWireError::ApiError(Box::new(e)))
}

/// Serves queries reading `information_schema.columns` through [`rewrite_columns`].
pub(super) struct InformationSchemaTypes;

#[async_trait]
impl QueryHook for InformationSchemaTypes {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        let statement = rewrite_columns(statement)?;
        Some(
            async {
                let plan = plan(ctx, statement).await?;
                let frame = ctx
                    .execute_logical_plan(plan)
                    .await
                    .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
                Ok(Response::Query(
                    encode_dataframe(frame, &Format::UnifiedText, None).await?,
                ))
            }
            .await,
        )
    }

    /// The plan of the rewritten query; datafusion-postgres binds and runs it.
    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        let statement = rewrite_columns(statement)?;
        Some(plan(ctx, statement).await)
    }

    async fn handle_extended_query(
        &self,
        _statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrow_types_get_postgresql_names() {
        for (arrow, pg) in [
            ("Utf8", "text"),
            ("Float64", "double precision"),
            ("Int64", "bigint"),
            ("Boolean", "boolean"),
            (r#"Timestamp(ns, "UTC")"#, "timestamp with time zone"),
            ("Timestamp(ns)", "timestamp without time zone"),
            ("Timestamp(Nanosecond, None)", "timestamp without time zone"),
            ("Date32", "date"),
            ("List(Int64)", "ARRAY"),
            (
                r#"Map("entries": non-null Struct("keys": non-null Utf8), unsorted)"#,
                "text",
            ),
        ] {
            assert_eq!(pg_type_name(arrow), pg, "{arrow}");
        }
    }

    #[test]
    fn only_queries_reading_information_schema_columns_are_rewritten() {
        let parse = |sql: &str| {
            Parser::new(&PostgreSqlDialect {})
                .try_with_sql(sql)
                .and_then(|mut p| p.parse_statement())
                .unwrap()
        };
        assert!(rewrite_columns(&parse("SELECT * FROM telemetry")).is_none());
        assert!(rewrite_columns(&parse("SELECT * FROM information_schema.tables")).is_none());
        let rewritten = rewrite_columns(&parse(
            "SELECT c.data_type FROM information_schema.columns c WHERE c.table_name = 't'",
        ))
        .unwrap()
        .to_string();
        assert!(
            rewritten.contains("sluice_pg_type_name(data_type)"),
            "{rewritten}"
        );
        assert!(
            rewritten.contains("sluice.information_schema.columns) c "),
            "{rewritten}"
        );
    }
}
