from moe_lab.cli import main

raise SystemExit(main())
