//! Functions whose result can be far larger than their arguments (`repeat('x',
//! 2000000000)` is 2 GB from a dozen bytes of SQL) build it in one allocation that no
//! memory pool sees. Each is replaced by itself behind a check: the bytes a call would
//! build are worked out from its arguments first, and a call over
//! [`QueryLimits::max_value_bytes`](crate::QueryLimits::max_value_bytes) is an error
//! instead of an allocation. The planner's constant folding calls them too, so the
//! check also holds for constants.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::kernels::{cast::cast, length::length};
use arrow::datatypes::{DataType, FieldRef, Int64Type};
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::FunctionRegistry;
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature,
};

/// How a function's result size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(s, n)`: Σ len(s) × n.
    Repeat,
    /// `lpad(s, n [, fill])`, `rpad`: Σ n (characters of at least a byte).
    Pad,
    /// `array_repeat(e, n)`: Σ n elements of at least 8 bytes.
    ArrayRepeat,
    /// `range(a, b [, step])`, `generate_series`: Σ (b − a) / step elements of 8 bytes.
    Series,
}

const GUARDED: [(&str, Growth); 6] = [
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("array_repeat", Growth::ArrayRepeat),
    ("range", Growth::Series),
    ("generate_series", Growth::Series),
];

/// Puts the guarded functions of `ctx` behind the check (those it has).
pub(crate) fn register(ctx: &SessionContext, max_bytes: usize) {
    for (name, growth) in GUARDED {
        if let Ok(inner) = ctx.udf(name) {
            ctx.register_udf(ScalarUDF::new_from_impl(Guarded {
                inner: inner.as_ref().clone(),
                growth,
                max_bytes,
            }));
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Guarded {
    inner: ScalarUDF,
    growth: Growth,
    max_bytes: usize,
}

impl Guarded {
    fn check(&self, args: &ScalarFunctionArgs) -> Result<()> {
        let Some(bytes) = estimate(self.growth, &args.args, args.number_rows) else {
            return Ok(());
        };
        if bytes > self.max_bytes as u128 {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{}() would build {bytes} bytes of values at once, more than a query may \
                 (a quarter of query.max_memory_bytes: {} bytes)",
                self.inner.name(),
                self.max_bytes
            )));
        }
        Ok(())
    }
}

impl ScalarUDFImpl for Guarded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.inner().return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        self.check(&args)?;
        self.inner.invoke_with_args(args)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

/// The bytes a call would build at least, or `None` if its arguments say nothing
/// (types this does not know: the call goes ahead).
fn estimate(growth: Growth, args: &[ColumnarValue], rows: usize) -> Option<u128> {
    let array = |i: usize| args.get(i)?.to_array(rows.max(1)).ok();
    let ints = |a: &ArrayRef| cast(a, &DataType::Int64).ok();
    let n = |a: &ArrayRef, i: usize| {
        let a = a.as_primitive::<Int64Type>();
        (!a.is_null(i)).then(|| a.value(i))
    };
    let total = |each: &dyn Fn(usize) -> Option<u128>, len: usize| {
        (0..len).map(|i| each(i).unwrap_or(0)).sum::<u128>()
    };
    match growth {
        Growth::Repeat => {
            let strings = array(0)?;
            let lengths = ints(&length(&strings).ok()?)?;
            let counts = ints(&array(1)?)?;
            let each = |i| Some(n(&lengths, i)?.max(0) as u128 * n(&counts, i)?.max(0) as u128);
            Some(total(&each, counts.len().min(lengths.len())))
        }
        Growth::Pad => {
            let widths = ints(&array(1)?)?;
            Some(total(
                &|i| Some(n(&widths, i)?.max(0) as u128),
                widths.len(),
            ))
        }
        Growth::ArrayRepeat => {
            let counts = ints(&array(1)?)?;
            Some(total(
                &|i| Some(n(&counts, i)?.max(0) as u128 * 8),
                counts.len(),
            ))
        }
        Growth::Series => {
            if args.iter().any(|a| !a.data_type().is_integer()) {
                return None; // dates and timestamps with an interval step
            }
            let (start, stop) = match args.len() {
                1 => (None, ints(&array(0)?)?),
                _ => (Some(ints(&array(0)?)?), ints(&array(1)?)?),
            };
            let step = if args.len() == 3 {
                Some(ints(&array(2)?)?)
            } else {
                None
            };
            let each = |i| {
                let from = start.as_ref().map_or(Some(0), |s| n(s, i))? as i128;
                let to = n(&stop, i)? as i128;
                let by = step.as_ref().map_or(Some(1), |s| n(s, i))? as i128;
                if by == 0 {
                    return None; // an error of the function's own
                }
                Some((((to - from) / by).max(0) as u128 + 1) * 8)
            };
            Some(total(&each, stop.len()))
        }
    }
}

/// For tests: the guard of `name` as `ctx` has it.
#[cfg(test)]
fn guarded(ctx: &SessionContext, name: &str) -> bool {
    ctx.udf(name)
        .is_ok_and(|f| (f.inner().as_ref() as &dyn std::any::Any).is::<Guarded>())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(ctx: &SessionContext, sql: &str) -> Result<usize> {
        let batches = ctx.sql(sql).await?.collect().await?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    #[tokio::test]
    async fn an_oversized_value_is_an_error_before_it_is_built_and_small_ones_work() {
        let ctx = SessionContext::new();
        register(&ctx, 1 << 20);
        for (name, _) in GUARDED {
            assert!(guarded(&ctx, name), "{name}");
        }
        for sql in [
            "SELECT length(repeat('x', 2000000000))",
            "SELECT length(repeat(s, 100000)) FROM (VALUES ('abcdefghijk'), ('x')) t(s)",
            "SELECT lpad('x', 2000000000)",
            "SELECT rpad('x', 2000000000, 'yz')",
            "SELECT cardinality(array_repeat(1, 2000000000))",
            "SELECT cardinality(range(0, 2000000000))",
            "SELECT cardinality(generate_series(1, 10000000000, 2))",
        ] {
            let error = run(&ctx, sql).await.unwrap_err().to_string();
            assert!(
                error.contains("would build") && error.contains("bytes of values"),
                "{sql}: {error}"
            );
        }
        for sql in [
            "SELECT repeat('ab', 1000)",
            "SELECT repeat(s, n) FROM (VALUES ('a', 3), (NULL, 2), ('b', -1)) t(s, n)",
            "SELECT lpad('x', 10), rpad('x', 10, '-')",
            "SELECT array_repeat('a', 3), range(5), generate_series(1, 10, 3)",
            "SELECT range(DATE '2024-01-01', DATE '2024-02-01', INTERVAL '1' DAY)",
        ] {
            assert!(run(&ctx, sql).await.is_ok(), "{sql}");
        }
    }
}
