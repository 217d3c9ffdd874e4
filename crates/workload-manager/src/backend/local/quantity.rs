//! Kubernetes resource quantities (`512Mi`, `1.5Gi`, `500m`, `1e9`), read as strictly as the API
//! server reads them: anything else (`512MB`, `NaN`, `inf`, ` 1Gi`) is an error naming the text,
//! never a silent default or a limit of zero.

/// Most a quantity may be (the API server's bound).
const MAX: f64 = i64::MAX as f64;

/// The value of a quantity: `[+-]<number><suffix>`, the number `1`, `1.5`, `1.` or `.5`, the
/// suffix binary (`Ki`…`Ei`), decimal (`n`, `u`, `m`, none, `k`, `M`, `G`, `T`, `P`, `E`) or an
/// exponent (`e3`, `E-2`).
pub fn parse(q: &str) -> Result<f64, String> {
    let bad = || format!("{q:?} is not a Kubernetes quantity (such as 512Mi, 1.5Gi, 500m or 1e9)");
    let (sign, rest) = match q.as_bytes().first() {
        Some(b'-') => (-1.0, &q[1..]),
        Some(b'+') => (1.0, &q[1..]),
        _ => (1.0, q),
    };
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(end);
    if number.matches('.').count() > 1 || !number.bytes().any(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let binary = |power: i32| 2f64.powi(power);
    let multiplier = match suffix {
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => binary(10),
        "Mi" => binary(20),
        "Gi" => binary(30),
        "Ti" => binary(40),
        "Pi" => binary(50),
        "Ei" => binary(60),
        e if e.starts_with(['e', 'E']) => {
            let exponent = &e[1..];
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            10f64.powi(exponent.parse::<i32>().map_err(|_| bad())?)
        }
        _ => return Err(bad()),
    };
    let v = sign * value * multiplier;
    if !v.is_finite() || v.abs() > MAX {
        return Err(format!("{q:?} is too large"));
    }
    Ok(v)
}

/// A non-negative quantity in bytes, rounded up (as Kubernetes rounds a value).
pub fn bytes(q: &str) -> Result<u64, String> {
    non_negative(q, 1.0)
}

/// A non-negative CPU quantity in millicores, rounded up.
pub fn millicores(q: &str) -> Result<u64, String> {
    non_negative(q, 1e3)
}

fn non_negative(q: &str, scale: f64) -> Result<u64, String> {
    let v = parse(q)? * scale;
    if v < 0.0 {
        return Err(format!("{q:?} is negative"));
    }
    // At most `i64::MAX` (checked above), which a `u64` holds.
    Ok(v.ceil().min(MAX) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_api_server_takes_is_read_with_its_rounding() {
        assert_eq!(bytes("512Mi"), Ok(512 << 20));
        assert_eq!(bytes("1Gi"), Ok(1 << 30));
        assert_eq!(bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(bytes("128M"), Ok(128_000_000));
        assert_eq!(bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(bytes("1E3"), Ok(1000));
        assert_eq!(bytes("100"), Ok(100));
        assert_eq!(bytes("+5."), Ok(5));
        assert_eq!(bytes(".5k"), Ok(500));
        assert_eq!(bytes("1E"), Ok(1_000_000_000_000_000_000), "E alone is exa");
        assert_eq!(bytes("1500m"), Ok(2), "rounded up");
        assert_eq!(bytes("0"), Ok(0));
        assert_eq!(millicores("500m"), Ok(500));
        assert_eq!(millicores("2"), Ok(2000));
        assert_eq!(millicores("0.25"), Ok(250));
        assert_eq!(millicores("100u"), Ok(1), "rounded up");
        assert_eq!(millicores("1e-3"), Ok(1));
    }

    #[test]
    fn anything_else_is_an_error_naming_it() {
        for q in [
            "512MB",
            "1gi",
            "NaN",
            "inf",
            "-inf",
            "lots",
            "",
            " 1Gi",
            "1Gi ",
            "1..5",
            ".",
            "1e",
            "1e+",
            "1e1.5",
            "0x10",
            "1_000",
            "Mi",
            "1 Gi",
            "1e99999999999",
        ] {
            let e = bytes(q).expect_err(q);
            assert!(e.contains(&format!("{q:?}")), "{e}");
        }
        assert!(bytes("1e30").unwrap_err().contains("too large"));
        assert!(bytes("10Ei").unwrap_err().contains("too large"));
        assert!(bytes("-1Gi").unwrap_err().contains("negative"));
        assert!(millicores("-1").unwrap_err().contains("negative"));
        assert_eq!(
            parse("-1.5k"),
            Ok(-1500.0),
            "a negative quantity is still a quantity"
        );
    }
}
