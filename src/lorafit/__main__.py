from lorafit.cli import main

raise SystemExit(main())
