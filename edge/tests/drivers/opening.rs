use super::*;
use ems_edge::platform;

fn parse(text: &str) -> MeterConfig {
    toml::from_str(text).unwrap()
}

#[test]
fn every_kind_parses_and_unknown_keys_fail() {
    for text in [
        "id = \"a\"\nkind = \"ina219\"\nshunt_ohms = 0.1\nmax_current_a = 3.2\n",
        "id = \"a\"\nkind = \"ina226\"\nbus = 3\naddress = 0x45\nshunt_ohms = 0.002\nmax_current_a = 10\n",
        "id = \"a\"\nkind = \"atm90e32\"\nugain = [1,2,3]\nigain = [4,5,6]\n",
        "id = \"a\"\nkind = \"pulse\"\npin = 17\npulses_per_kwh = 800\n",
        "id = \"a\"\nkind = \"modbus\"\nprofile = \"pzem004t\"\n",
    ] {
        let c = parse(text);
        assert_eq!(c.id(), "a");
    }
    assert!(toml::from_str::<MeterConfig>(
        "id = \"a\"\nkind = \"ina219\"\nshunt = 0.1\nmax_current_a = 3.2\n"
    )
    .is_err());
}

/// On a host without the buses, opening fails with a hint, never a panic.
#[test]
fn opening_missing_hardware_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "id = \"i\"\nkind = \"ina219\"\nbus = 250\nshunt_ohms = 0.1\nmax_current_a = 3.2\n",
            "dtparam=i2c_arm=on",
        ),
        (
            "id = \"s\"\nkind = \"atm90e32\"\nbus = 6\nchip_select = 2\nugain = [1,1,1]\nigain = [1,1,1]\n",
            "dtparam=spi=on",
        ),
        (
            "id = \"m\"\nkind = \"modbus\"\nprofile = \"sdm120\"\nport = \"/dev/ttyEMS-does-not-exist\"\n",
            "enable_uart=1",
        ),
    ];
    for (text, hint) in cases {
        match platform::open(&parse(text), dir.path()) {
            Ok(_) => panic!("opened {text}"),
            Err(e) => {
                let h = e.hint.clone().unwrap_or_default();
                assert!(h.contains(hint), "{e}: {h}");
            }
        }
    }
    // GPIO: not a Pi here (or a Pi: then it may open); never a panic.
    let r = platform::open(
        &parse("id = \"p\"\nkind = \"pulse\"\npin = 17\npulses_per_kwh = 1000\n"),
        dir.path(),
    );
    if let Err(e) = r {
        assert!(!e.message.is_empty());
    }
}
